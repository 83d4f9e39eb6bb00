"""Test helper shared by the store tests: an entry as versions before issue 15 wrote it."""
import io
import os

import h5py


def unsealed(entry):
    """Rewrite a store entry as versions before issue 15 wrote it: the same HDF5 content, no seal (user block)."""
    source = io.BytesIO(entry.read_bytes())
    temporary = entry.with_name(entry.name + ".unsealed")
    with h5py.File(source, "r") as old, h5py.File(temporary, "w") as new:
        for key, value in old.attrs.items():
            new.attrs[key] = value
        for name in old:
            old.copy(old[name], new, name=name)
    os.replace(temporary, entry)
    return entry
