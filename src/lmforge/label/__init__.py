"""Human feedback: a labelling web app whose judgments become reward, DPO, KTO and SFT data.

    store.py      SQLite (WAL) store: items, responses, annotators, assignments, judgments
    agreement.py  Krippendorff's alpha per annotator pair and overall
    export.py     judgments -> preference / KTO / SFT / per-item JSONL (what `reward` and `dpo` read)
    select.py     active selection: the items a reward model is least sure of (or two disagree on) first
    app.py        the FastAPI server and its page (static/), every call token-checked
    stage.py      the `label` stage and `lmforge label`: prompts -> responses -> server -> export
"""
