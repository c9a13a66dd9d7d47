"""The pipeline's stages, one module each, each with one ``run_<stage>(cfg, run)`` entry.

No stage imports another (``tests/test_layout.py``); what they share lives in the library beside
them (``judge``, ``rl``, ``training``, ``store``, ``labels``). The pipeline stage, its notebook,
its modules and CLI commands:

=============  ==============================  ================  ====================  ==========================
pipeline       notebook                        module(s)         CLI                   writes
=============  ==============================  ================  ====================  ==========================
constitution   00_setup_and_constitution       setup             constitution, doctor  constitution/
sl             01_sl_critique_revision         sl                sl                    data/sl
curate         02_curate                       curate            curate                data/curated
sft            03_sft                          sft               sft                   models/sft
feedback       04_pairs_and_ai_feedback        pairs, judge      pairs, judge          data/pairs, data/preferences
labels         05_label_edge_cases             cai_dpo.labels    labels                data/preferences_merged
dpo            06_dpo                          dpo               dpo                   models/dpo
ppo            07_preference_model_and_ppo     rm, ppo           rm, ppo               models/rm, models/ppo
eval           08_evaluate_and_compare         evaluate          eval, report          eval/, report/
=============  ==============================  ================  ====================  ==========================
"""
