"""Command-line front ends: `tokend` (daemon, simulators) and `tokenctl`."""
