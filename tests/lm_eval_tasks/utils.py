"""Loader of this folder's offline tasks: `dataset_path: json` with `dataset_kwargs.data_files`
relative to this folder, so the tasks run from any working directory (the harness would hand
relative data_files to `datasets` as they are, i.e. relative to the current directory)."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _resolve(files):
    if isinstance(files, str):
        return files if os.path.isabs(files) else os.path.join(HERE, files)
    if isinstance(files, dict):
        return {split: _resolve(value) for split, value in files.items()}
    return [_resolve(value) for value in files]


def load_local_json(data_files=None, **_metadata):
    """The task's `custom_dataset`: the harness calls it with the task's metadata and its
    dataset_kwargs; returns the DatasetDict of `datasets.load_dataset("json", ...)`."""
    import datasets

    if not data_files:
        raise ValueError("dataset_kwargs.data_files is required (relative paths are read beside this file)")
    return datasets.load_dataset("json", data_files=_resolve(data_files))
