"""Example factories for `model.family: custom` (see digits.py and configs/digits-custom.yaml)."""
