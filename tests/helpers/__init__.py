"""Test helpers: tiny models with closed-form answers (:mod:`helpers.models`) and a TensorBoard event reader
(:mod:`helpers.tb`). Importable as ``helpers`` because ``tests/conftest.py`` puts ``tests/`` on ``sys.path``."""
