"""Write the stage notebooks in notebooks/ (no outputs). Edit here, then run:

python tools/make_notebooks.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parent.parent / "notebooks"

PARAMS = """# Parameters (papermill overrides these; edit them to step through by hand)
profile = "cpu-demo"      # tiny | cpu-demo | gpu-qlora | path to a YAML config
run_id = None             # default: the profile's run_id -> artifacts/runs/<run_id>/
config_path = None        # the pipeline passes the run's saved config.yaml
# overrides: "key=value" strings, e.g. ["sl.rounds=3", "judge.model.name=/models/judge-7b"]
overrides = []"""

# every notebook opens the same run folder whatever its working directory; only the first creates it
OPEN = (
    "cfg, run = open_run(profile, run_id, overrides, config_path, knobs={knobs}, create={create})\n"
    'print(f"run folder: {{run.root}}")'
)


def nb(
    name: str, intro: str, knobs: dict[str, str], cells: list[tuple[str, str]], imports: str, *, create: bool = False
) -> tuple[str, nbformat.NotebookNode]:
    """One stage notebook: its file name and contents (intro, parameters, the run-opening cell, ``cells``)."""
    params = PARAMS + ("\n" + "\n".join(f"{k} = None  # {v}" for k, v in knobs.items()) if knobs else "")
    knob_map = "{" + ", ".join(f'"{v.split()[0]}": {k}' for k, v in knobs.items()) + "}" if knobs else "None"
    cell_list = [new_markdown_cell(intro)]
    pc = new_code_cell(params)
    pc.metadata["tags"] = ["parameters"]
    cell_list.append(pc)
    cell_list.append(new_code_cell(imports + "\n\n" + OPEN.format(knobs=knob_map, create=create)))
    for kind, text in cells:
        cell_list.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    for i, cell in enumerate(cell_list):
        cell.id = f"{name[:2]}-{i:02d}"  # stable ids: regenerating changes only what changed
    book = new_notebook(
        cells=cell_list,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    return f"{name}.ipynb", book


def build() -> Iterator[tuple[str, nbformat.NotebookNode]]:
    """Every stage notebook as ``(file name, notebook)``, in pipeline order: ``NN_<stage>.ipynb`` for
    each stage of :data:`cai_dpo.pipeline.STAGES`."""
    yield nb(
        "00_setup",
        """# 0 · Setup and the constitution

Constitutional AI (Bai et al. 2022) trains a model to be harmless without human harm labels: a short
written list of principles — the **constitution** — steers both the model's self-critiques (SL-CAI)
and the AI judge that labels preferences (RLAIF). This notebook checks the machine, prepares the
model, shows the constitution, and runs its **edge-case tests**: pairs where the better answer is
obvious, so a judge that fails them is not to be trusted with the real pairs.""",
        {},
        [
            ("code", "print(format_report(doctor_report()))"),
            (
                "md",
                (
                    "The principles. Each has a critique request, a revision request and a comparison question for the "
                    "judge."
                ),
            ),
            ("code", "constitution = load_constitution(cfg.constitution_path())\nprint(format_table(constitution))"),
            ("code", "constitution_explorer(constitution)"),
            (
                "md",
                (
                    "Edge-case tests: the judge's probability for the expected answer, both orders averaged. A small "
                    "judge near 0.5 is guessing."
                ),
            ),
            (
                "code",
                (
                    "setup_dir = run_setup(cfg, run)\n"
                    "print((setup_dir / 'cases.txt').read_text() if (setup_dir / 'cases.txt').exists() else 'no "
                    "edge-case file beside this constitution')"
                ),
            ),
        ],
        (
            "from cai_dpo.constitution import format_table, load_constitution\n"
            "from cai_dpo.doctor import doctor_report, format_report\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.stages.setup import run_setup\n"
            "from cai_dpo.widgets import constitution_explorer"
        ),
        create=True,
    )

    yield nb(
        "01_sl",
        """# 1 · SL-CAI: critique and revision

The helpful-only model answers red-team prompts. Then, for a few rounds, it **critiques** its own
answer against one randomly drawn principle and **revises** it. The final revisions, mixed with
ordinary helpful answers, become the fine-tuning data of the SL-CAI model. Every round is kept, and
the run reports collapse signals (diversity, repetition, revisions identical to their input).""",
        {"rounds": "sl.rounds  (critique/revision rounds)", "mode": "sl.mode  ('critique' or 'direct')"},
        [
            ("code", "sl_dir = run_sl(cfg, run)\nmanifest = read_manifest(sl_dir)\nmanifest['metrics']"),
            ("md", "A few prompts, their first answer and their final revision:"),
            (
                "code",
                (
                    "records = run.records('sl').records()\n"
                    "pd.DataFrame([{k: r[k] for k in ('category', 'prompt', 'initial', 'final')} for r in records[:6]])"
                ),
            ),
            (
                "code",
                (
                    "pd.DataFrame([dict(prompt_id=r['prompt_id'], **{k: x[k] for k in ('round', 'principle_id', "
                    "'critique', 'revision')}) for r in records[:2] for x in r['rounds']])"
                ),
            ),
        ],
        (
            "import pandas as pd\n"
            "\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.stages.sl import run_sl\n"
            "from cai_dpo.store import read_manifest"
        ),
    )

    yield nb(
        "02_curate",
        """# 2 · Curation: score the data against the constitution

At small scale the model's own revisions are often garbled, so the fine-tuning data is **curated**
before SFT: every (prompt, response) row — the SL-CAI revisions, the project's curated set, a file
of your own — is scored against the constitution, and rows below a threshold are dropped or
down-weighted. Two scorers are measured on held-out curated examples (the curated response vs the
policy's own answer to a harmful request, or a needless decline of a benign one): the constitution
**judge**, and a light **probe** (logistic regression on the policy's hidden states) that works
where the judge is at chance. `curate.scorer: auto` uses the more accurate one.""",
        {
            "scorer": "curate.scorer  (auto | probe | judge)",
            "action": "curate.action  (keep | drop | weight)",
            "threshold": "curate.threshold  (rows scored below it are dropped or down-weighted)",
        },
        [
            (
                "code",
                (
                    "curated_dir = run_curate(cfg, run)\n"
                    "manifest = read_manifest(curated_dir)\n"
                    "print('\\n'.join(manifest['notes']))\n"
                    "manifest['counts']"
                ),
            ),
            ("md", "Each scorer's accuracy on the held-out curated pairs (Wilson 95 % intervals; chance is 0.5):"),
            (
                "code",
                (
                    "pd.DataFrame({name: {'pairwise': m['pairwise']['accuracy'], 'low': m['pairwise']['lo'], 'high': "
                    "m['pairwise']['hi'], 'n pairs': m['pairwise']['n'], 'classification': "
                    "m['classification']['accuracy']} for name, m in manifest['metrics']['candidates'].items()}).T"
                ),
            ),
            ("md", "The lowest- and highest-scored rows:"),
            (
                "code",
                (
                    "rows = datasets.load_from_disk(str(curated_dir)).to_pandas()\n"
                    "rows['prompt'] = rows['messages'].map(lambda m: m[-2]['content'][:80])\n"
                    "rows['response'] = rows['messages'].map(lambda m: m[-1]['content'][:120])\n"
                    "shown = rows.sort_values('curate_score')[['source', 'kind', 'curate_score', 'weight', 'prompt', "
                    "'response']]\n"
                    "shown if len(shown) <= 6 else pd.concat([shown.head(3), shown.tail(3)])  # the lowest and highest "
                    "scores"
                ),
            ),
        ],
        (
            "import datasets\n"
            "import pandas as pd\n"
            "\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.stages.curate import run_curate\n"
            "from cai_dpo.store import read_manifest"
        ),
    )

    yield nb(
        "03_sft",
        """# 3 · Supervised fine-tuning: the SL-CAI model

A LoRA adapter (QLoRA when the profile loads the model in 4-bit) is trained on the revisions, the
curated set's train split (explained declines and direct answers, `sft.data`), or both, with the
loss on the assistant's tokens only; `sft.weighting: principle` weights each example by its
principles. The result, `models/sft`, is the starting point of everything after it: it samples the
response pairs, and DPO and PPO start from it.""",
        {
            "max_steps": "sft.max_steps  (training steps; -1 means whole epochs)",
            "data": "sft.data  (sl | curated | both)",
        },
        [
            (
                "code",
                (
                    "sft_dir = run_stage('sft', cfg, run)  # several processes when train.launcher is accelerate\n"
                    "manifest = read_manifest(sft_dir)\n"
                    "{k: manifest[k] for k in ('counts', 'metrics', 'timings')}"
                ),
            ),
            (
                "code",
                (
                    "log = pd.read_csv(run.metrics_dir('sft') / 'log.csv')\n"
                    "log[[c for c in ('step', 'loss', 'eval_loss') if c in log]].plot(x='step', marker='o', title='SFT "
                    "loss');"
                ),
            ),
        ],
        (
            "import pandas as pd\n"
            "\n"
            "from cai_dpo.distributed import run_stage\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.store import read_manifest"
        ),
    )

    yield nb(
        "04_pairs",
        """# 4 · Response pairs

The SL-CAI model samples two answers per prompt for the judge of the next notebook (`05_judge`) to
compare. Two kinds of pair already know their better answer: **revision-vs-original** pairs
(chosen = the final revision, rejected = the first answer) and **curated** pairs (chosen = the curated
answer, rejected = what the SL-CAI model says now to the same prompt), which carry signal at any scale.
`pairs.source` picks the kind, or `mixed` for all of them.""",
        {"source": "pairs.source  (judged_samples | revision_vs_original | curated | mixed)"},
        [
            ("code", "pairs_dir = run_pairs(cfg, run)\nread_manifest(pairs_dir)['counts']"),
        ],
        (
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.stages.pairs import run_pairs\n"
            "from cai_dpo.store import read_manifest"
        ),
    )

    yield nb(
        "05_judge",
        """# 5 · AI feedback (RLAIF): the judge

The **judge** reads the conversation, one constitutional principle and the two answers of a pair as
options (A) and (B), and its soft label is the normalised probability of " (A)" vs " (B)" — averaged
over both orders to cancel position bias. Before labelling, the judge's accuracy is measured on
clear-cut pairs (the **quality gate**). A judge near chance (as the embedded 135M model is) cannot give
a useful signal; then the pipeline leans on **revision-vs-original** pairs (chosen = the final
revision, rejected = the first answer) and routes more pairs to a person. **Curated** pairs (chosen =
the curated answer, rejected = what the SL-CAI model says now to the same prompt) carry signal at any
scale and pass through with a fixed confidence.""",
        {},
        [
            (
                "code",
                (
                    "prefs_dir = run_judge(cfg, run)\n"
                    "manifest = read_manifest(prefs_dir)\n"
                    "print('\\n'.join(manifest['notes']))\n"
                    "manifest['metrics']"
                ),
            ),
            (
                "code",
                (
                    "prefs = datasets.load_from_disk(str(prefs_dir)).to_pandas()\n"
                    "prefs[['source', 'category', 'p_chosen', 'score_ab', 'score_ba']].describe(include='all')"
                ),
            ),
            ("code", "prefs['p_chosen'].plot.hist(bins=20, title='label confidence p(chosen)');"),
        ],
        (
            "import datasets\n"
            "\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.stages.judge import run_judge\n"
            "from cai_dpo.store import read_manifest"
        ),
    )

    yield nb(
        "06_labels",
        """# 6 · Edge cases for a person

Pairs the judge is unsure of (confidence near 0.5), whose two orders disagree, whose principles
disagree, or where the judge prefers the original over the revision go to a **label queue** (SQLite in
the run folder). Label them below: every click is saved at once, so closing the browser loses nothing.
A person's label overrides the AI's; ties and skips leave the pair out. Run unattended, the widget
does not wait: the run goes on with the labels that exist, and the next run merges new ones.

**Write a better response**: edit the AI's answer in the box under the buttons and press *Save response*.
It is saved at once, like a label, and becomes SFT data (source `human_revision`) and a preference pair
preferring it over the original. This notebook comes after SFT, so written responses feed SFT on the
**next run**: when new ones exist, the pipeline reruns SFT and every stage after it. To rewrite SL-CAI
records instead, call `revision_ui(queue_path(cfg), datasets.load_from_disk(str(run.data_dir('sl'))))`
from `cai_dpo.widgets` in a cell of your own.""",
        {},
        [
            ("code", "merged_dir = run_labels(cfg, run)\nread_manifest(merged_dir)['counts']"),
            ("code", "labeling_ui(queue_path(cfg))"),
            (
                "md",
                "After labelling, re-run the cell below (or the next pipeline run does it) to merge the new labels.",
            ),
            ("code", "merged_dir = run_labels(cfg, run)\nread_manifest(merged_dir)['counts']"),
        ],
        (
            "from cai_dpo.labels import queue_path\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.stages.labels import run_labels\n"
            "from cai_dpo.store import read_manifest\n"
            "from cai_dpo.widgets import labeling_ui"
        ),
    )

    yield nb(
        "07_dpo",
        """# 7 · DPO: the shortcut

Direct preference optimisation trains the policy on the preferences directly, with no reward model
and no sampling during training. The reference model is the SL-CAI model itself (the new adapter
switched off). With **soft labels** each pair's loss is weighted by the judge's confidence
(conservative DPO with ε = 1 − p). With `dpo.rounds > 1`, each round samples fresh pairs from the
current model, judges them and continues (iterative, on-policy DPO).""",
        {"beta": "dpo.beta  (strength of the KL anchor)", "rounds": "dpo.rounds  (iterative DPO rounds)"},
        [
            (
                "code",
                (
                    "dpo_dir = run_stage('dpo', cfg, run)  # several processes when train.launcher is accelerate\n"
                    "manifest = read_manifest(dpo_dir)\n"
                    "{k: manifest[k] for k in ('counts', 'metrics', 'timings')}"
                ),
            ),
            (
                "code",
                (
                    "log = pd.read_csv(run.metrics_dir('dpo') / 'log.csv')\n"
                    "cols = [c for c in log.columns if c in ('loss', 'rewards/accuracies', 'rewards/margins')]\n"
                    "log.plot(x='step', y=cols, subplots=True, marker='o', figsize=(7, 6));"
                ),
            ),
        ],
        (
            "import pandas as pd\n"
            "\n"
            "from cai_dpo.distributed import run_stage\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.store import read_manifest"
        ),
    )

    yield nb(
        "08_rm",
        """# 8 · The preference model

The same preferences DPO learns from train an explicit **preference model** (a scalar head on the
SL-CAI model, soft cross-entropy on p(chosen)): the reward of the paper's RL-CAI, which PPO optimises
in the next notebook (`09_ppo`).""",
        {},
        [
            (
                "code",
                (
                    "rm_dir = run_stage('rm', cfg, run)  # several processes when train.launcher is accelerate\n"
                    "read_manifest(rm_dir)['metrics']"
                ),
            ),
        ],
        (
            "from cai_dpo.distributed import run_stage\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.store import read_manifest"
        ),
    )

    yield nb(
        "09_ppo",
        """# 9 · PPO (the paper's RL-CAI)

**PPO** samples from the policy, scores each answer with the preference model of `08_rm`, subtracts a
per-token KL penalty to the SL-CAI model, and updates with clipped policy and value losses over GAE
advantages (with `ppo.advantage: leave_one_out`, each answer against the other answers to its prompt,
and no value model). DPO (`07_dpo`) gets there without the reward model and the sampling loop; these
notebooks let you compare the two.""",
        {"ppo_steps": "ppo.steps  (PPO iterations)", "kl_coef": "ppo.kl_coef  (KL penalty)"},
        [
            (
                "code",
                (
                    "ppo_dir = run_stage('ppo', cfg, run)\n"
                    "manifest = read_manifest(ppo_dir)\n"
                    "{k: manifest[k] for k in ('counts', 'metrics', 'timings')}"
                ),
            ),
            (
                "code",
                (
                    "log = pd.read_csv(run.metrics_dir(cfg.ppo.mode) / 'log.csv')\n"
                    "log.plot(x='step', y=[c for c in ('reward', 'kl', 'entropy') if c in log], subplots=True, "
                    "marker='o', figsize=(7, 6));"
                ),
            ),
        ],
        (
            "import pandas as pd\n"
            "\n"
            "from cai_dpo.distributed import run_stage\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.store import read_manifest"
        ),
    )

    yield nb(
        "10_eval",
        """# 10 · Evaluate and compare

Base, SL-CAI, DPO and PPO answer **labelled held-out** prompts (never seen in training) with identical
sampling: red-team prompts (plain and in the configured conditions), everyday helpful prompts, the
curated held-out split (including benign prompts that only *sound* sensitive) and any benchmark files
in `eval.benchmarks`. The headline comes from a rule-based response classifier that uses no trained
model (explained decline / bare refusal / complies), with intervals over prompts and paired
differences vs base. Judge win rates and Elo follow, marked uninformative when the judge failed its
quality gate. The report opens with a "How to read this" block.""",
        {},
        [
            ("code", "eval_dir = run_eval(cfg, run)\nreport = render_report(run.root)\nprint(f'report: {report}')"),
            ("code", "text = report.read_text()\ndisplay(Markdown(text[: text.index('## By prompt set')]))"),
            ("code", "display(Markdown(text[text.index('## By prompt set'):]))"),
            ("code", "for png in sorted(report.parent.glob('*.png')):\n    display(Image(filename=str(png)))"),
            (
                "md",
                (
                    "**Export** one model (merged weights, tokenizer, chat template, model card) that plain "
                    "transformers, vLLM or llama.cpp load. By default the model with the highest harmful-prompt "
                    "decline rate among those answering ≥ 90 % of benign prompts, else DPO; pass "
                    "`model='sft'|'dpo'|'ppo'` to choose. Same as `cai-dpo export`."
                ),
            ),
            (
                "code",
                (
                    "from cai_dpo.export import export_model\n"
                    "\n"
                    "exported = export_model(cfg, run)\n"
                    "print(f'exported {exported.model} ({exported.reason}): {exported.folder}')"
                ),
            ),
        ],
        (
            "from IPython.display import Image, Markdown, display\n"
            "\n"
            "from cai_dpo.pipeline import open_run\n"
            "from cai_dpo.report import render_report\n"
            "from cai_dpo.stages.eval import run_eval"
        ),
    )


#: Notebooks earlier versions of this generator wrote under other names; :func:`main` removes them
#: (and no other file, so a notebook of the user's own stays)
RETIRED = (
    "00_setup_and_constitution.ipynb",
    "01_sl_critique_revision.ipynb",
    "02_sft.ipynb",
    "03_pairs_and_ai_feedback.ipynb",
    "04_label_edge_cases.ipynb",
    "04_pairs_and_ai_feedback.ipynb",
    "05_dpo.ipynb",
    "05_label_edge_cases.ipynb",
    "06_dpo.ipynb",
    "06_preference_model_and_ppo.ipynb",
    "07_evaluate_and_compare.ipynb",
    "07_preference_model_and_ppo.ipynb",
    "08_evaluate_and_compare.ipynb",
)


def main(out: Path = OUT) -> None:
    """Write every notebook of :func:`build` into ``out`` and remove the retired ones (:data:`RETIRED`)."""
    out.mkdir(exist_ok=True)
    names = set()
    for name, book in build():
        nbformat.write(book, out / name)
        names.add(name)
    for name in RETIRED:
        if name not in names:
            (out / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
