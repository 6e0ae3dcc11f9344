"""Plotting code: reads only run logs (HDF5) and profile JSON, writes PNGs here."""
