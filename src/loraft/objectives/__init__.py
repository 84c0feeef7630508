"""The objectives' modules, one each (sft.py, dpo.py, kto.py, orpo.py; trl_common.py what the TRL ones share), and
kinds.py (record kinds). The table that names them is loraft.objective_table."""
