"""`psm bench load CONFIG`: what parsing data.root's train annotations costs a training job's
driver (time, peak memory) and what its workers then share (the ImageTable's bytes). Run it in
a fresh process per size: the peak is the process's. `psm make-data coco-size` writes a
COCO-size root to run it on."""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import time

from benchmarks.model import machine
from jobs import command, storage
from pipelines.augment import ImageTable
from pipelines.coco import load_split
from pipelines.uris import write_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Parses data.root's train annotations as a training job's driver does (load_split), "
        "builds the ImageTable its workers read from Ray's object store, and prints the wall "
        "and CPU seconds, the process's peak RSS and the table's bytes."
    )
    command.add_config_arguments(p)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    cfg = command.load(args)
    if args.json:
        storage.require_output_file(args.json, "--json")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    records, skips = load_split(cfg, "train")
    parsed_s, parsed_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    table = ImageTable.from_records(records)
    buffers: list[pickle.PickleBuffer] = []
    pickle.dumps(table, protocol=5, buffer_callback=buffers.append)  # as Ray puts it
    record = {
        "machine": machine(),
        "annotations": f"{cfg.data.root}/{cfg.data.train_annotations}",
        "images": len(records),
        "persons": table.persons,
        "load_split_s": round(parsed_s, 2),
        "load_split_cpu_s": round(parsed_cpu, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "table_mb": round(sum(b.raw().nbytes for b in buffers) / 2**20, 1),
        "skipped": dict(skips),
    }
    print(json.dumps(record, indent=1))
    if args.json:
        write_bytes(args.json, json.dumps(record, indent=1).encode())
