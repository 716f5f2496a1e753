"""Virtual tokens for tests and `tokend simulate`. Installed as ``tokend.simulators``."""
