"""The PIV wire package (rank 0, no I/O): `tokend.piv.codes` (AID, instructions, key
references, data objects, tags, algorithms, policies, the default management key, the PIN
format) and `tokend.piv.commands` (GET/PUT DATA, the dynamic authentication template, the
certificate container, Key History and CHUID, the public-key codec, the management-key
cipher), imported by the PIV driver, the virtual PIV card, the demo provisioner and
`tokenctl`. Outside this package only `drivers/piv.py` and `simulators/piv.py` may name a
PIV instruction, tag or key reference (`tests/test_piv_names.py` checks)."""
