"""Steps shared by the workflows: a conversion run as a library call, and a step's output sent to a log."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


def convert(source: str, *options) -> Path:
    """The conversion ``organmtl convert SOURCE OPTIONS...`` performs, as a library call: the options
    are read by the converter's own argument definitions (so every default is the command's), then
    the converters' runner converts. Returns the output folder; a case that failed to convert (the
    command's exit code 1) raises :class:`~organmtl.converters.ConversionError`, so a workflow never
    goes on with part of a dataset."""
    from organmtl.converters import ConversionError, add_common_arguments
    from organmtl.converters.command import convert_with_status
    from organmtl.plugins.registry import all_converters, load_reference

    converters = all_converters()
    if source not in converters:
        raise ValueError(f"no converter named {source!r}; installed: {', '.join(sorted(converters))}")
    converter = load_reference(converters[source])
    parser = argparse.ArgumentParser(prog=f"organmtl convert {source}")
    add_common_arguments(parser, converter)
    out, status = convert_with_status(converter, parser.parse_args([str(o) for o in options]))
    if status != 0:
        raise ConversionError(f"organmtl convert {source} -> {out}: some cases failed to convert (listed above)")
    return out


@contextmanager
def output_to(log_file: Path):
    """Send everything this process writes to stdout and stderr while the block runs, and what its
    child processes write (nnU-Net's preprocessing workers), to ``log_file`` (appended)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a", buffering=1) as log, redirect_stdout(log), redirect_stderr(log):
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield Path(log_file)
        finally:
            log.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
