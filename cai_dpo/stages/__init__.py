"""The pipeline's stages, one module each, each with one ``run_<stage>(cfg, run)`` entry.

No stage imports another (``tests/test_layout.py``); what they share lives in the library beside
them (``judge``, ``rl``, ``training``, ``store``, ``labels``). One name per stage: the pipeline
stage ``<stage>`` (``cai-dpo run --from/--only <stage>``) is the module ``cai_dpo/stages/<stage>.py``,
the notebook ``notebooks/NN_<stage>.ipynb`` and the command ``cai-dpo <stage>``
(``tests/test_stage_names.py``):

======  ===========  ===============================  ===============================================
stage   notebook     command (and its neighbours)     writes
======  ===========  ===============================  ===============================================
setup   00_setup     setup (constitution, doctor)     constitution/
sl      01_sl        sl                               data/sl
curate  02_curate    curate                           data/curated
sft     03_sft       sft                              models/sft
pairs   04_pairs     pairs                            data/pairs
judge   05_judge     judge                            data/preferences
labels  06_labels    labels merge (export, import,    labels.sqlite, data/preferences_merged
                     status)
dpo     07_dpo       dpo                              models/dpo
rm      08_rm        rm                               models/rm
ppo     09_ppo       ppo                              models/ppo (models/rloo with ``ppo.mode: rloo``)
eval    10_eval      eval (report)                    eval/, report/
======  ===========  ===============================  ===============================================
"""
