"""The SIM wire package (rank 0, no I/O): `tokend.sim.codes` (the UICC's ICCID file, the
legacy IsoApplet's AID, instructions, PIN/PUK, lifecycle, algorithms, ACLs) and
`tokend.sim.commands` (its command builders), imported by the SIM driver, the virtual SIM
and its demo provisioner. PKCS#15 structures are in `tokend.pkcs15`."""
