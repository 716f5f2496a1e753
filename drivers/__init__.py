"""Drivers: one module per transport (pcsc, usb_ccid, ble) and per applet (piv, sim_pki),
plus the vendor-module backend. Installed as ``tokend.drivers``."""
