"""What `specops plan` reads: the runs a file describes, the verifier's shape, counted tokens.

A file is a local DataGenConfig or TrainConfig, or Kubernetes YAML with SpeculatorDataGen /
SpeculatorTraining objects (validated with the operator's own models; a training's TrainConfig is
rendered as the operator renders it for its pods). Nothing here loads model weights or talks to a
GPU: the shape comes from the spec, the table of common verifiers or `config.json`, and tokens are
counted with the tokenizer alone, by the code generation itself runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from specops.config import ConfigError, DataGenConfig, TrainConfig, VerifierConfig, load_config
from specops.plan import VerifierShape, known_shape


@dataclass(frozen=True)
class PlannedRun:
    """One data generation the file asks for, with what its cost depends on."""

    label: str
    config: DataGenConfig
    writers: int
    """Processes writing shards (slices x local workers); each closes its own shards."""
    gpu: bool
    """Whether the generators run on GPUs (what `auto` dtypes resolve to)."""
    online: bool
    """Examples stream through a ZeroMQ broker instead of landing on disk."""
    trainer_ranks: int = 1
    storage_bytes: int | None = None
    """The data claim's size, where the spec sets one."""
    broker_limit_bytes: int | None = None
    """The broker container's memory limit, where the spec sets one."""
    declared_shape: VerifierShape | None = None


@dataclass(frozen=True)
class PlannedTraining:
    """One training the file asks for: its TrainConfig and the data generation that feeds it."""

    label: str
    config: TrainConfig
    ranks: int = 1
    """Trainer processes (nodes x processes per node); a local TrainConfig plans one."""
    feed: str | None = None
    """Label of the planned data generation that writes or streams its examples, if any."""
    storage_bytes: int | None = None
    """The output claim's size, where the spec sets one."""


@dataclass(frozen=True)
class Planned:
    """Everything `specops plan` plans in one file."""

    runs: list[PlannedRun]
    trainings: list[PlannedTraining]


def planned(path: Path, allowed_roots: Sequence[str] = ()) -> Planned:
    """The data generations and trainings `path` describes; ConfigError naming the file when it holds none."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if any(isinstance(d, dict) and "kind" in d for d in docs):
        return _resources(text, str(path), allowed_roots)
    single = docs[0] if len(docs) == 1 and isinstance(docs[0], dict) else {}
    if "datasets" in single:
        config = load_config(DataGenConfig, path)
        if allowed_roots:
            run = config.run.model_copy(update={"allowed_roots": [*config.run.allowed_roots, *allowed_roots]})
            config = config.model_copy(update={"run": run})
        writers = config.run.num_shards * config.run.num_workers
        gpu, online = _local_gpu(config.engine.device), config.sync.kind == "zmq"
        return Planned([PlannedRun(str(path), config, writers, gpu, online)], [])
    if "data" in single and ({"outputDir", "output_dir"} & set(single)):
        train = load_config(TrainConfig, path)
        if allowed_roots:
            train = train.model_copy(update={"allowed_roots": [*train.allowed_roots, *allowed_roots]})
        return Planned([], [PlannedTraining(str(path), train)])
    raise ConfigError(
        f"{path}: neither a DataGenConfig (no `datasets`), a TrainConfig (no `data` and `outputDir`) nor "
        "SpeculatorDataGen/SpeculatorTraining objects"
    )


def _resources(text: str, source: str, allowed_roots: Sequence[str]) -> Planned:
    from specops_operator.api import (
        SpeculatorDataGen,
        SpeculatorDataGenSpec,
        SpeculatorTraining,
        load_resources,
    )
    from specops_operator.builders.datagen import DataGenNames
    from specops_operator.builders.training import DataSource, procs_per_node, render_config
    from specops_operator.estimate import quantity_bytes

    resources = load_resources(text, source)
    datagens = {r.metadata.name: r.spec for r in resources if isinstance(r, SpeculatorDataGen)}
    ranks: dict[str, int] = {}
    refs: list[str] = []
    specs: list[tuple[str, SpeculatorDataGenSpec]] = []
    trainings: list[PlannedTraining] = []
    for resource in resources:
        if isinstance(resource, SpeculatorTraining):
            spec, name = resource.spec, resource.metadata.name
            world = spec.nodes * procs_per_node(spec)
            if spec.data_gen is not None:
                feed, data_name, data_spec = f"SpeculatorTraining {name} (spec.dataGen)", name, spec.data_gen
                specs.append((feed, spec.data_gen))
            elif spec.data_gen_ref is not None:
                feed, data_name = f"SpeculatorDataGen {spec.data_gen_ref.name}", spec.data_gen_ref.name
                if data_name not in datagens:
                    refs.append(f"SpeculatorTraining {name} reads {data_name}")
                    continue
                data_spec = datagens[data_name]
            else:
                continue  # the spec's own rule requires one of the two
            ranks[feed] = world
            data = DataSource(DataGenNames(data_name, resource.metadata.namespace or "default"), data_spec)
            size = spec.storage.size
            trainings.append(
                PlannedTraining(
                    f"SpeculatorTraining {name}",
                    render_config(spec, data),
                    world,
                    feed,
                    quantity_bytes(size) if size is not None else None,
                )
            )
        elif isinstance(resource, SpeculatorDataGen):
            specs.append((f"SpeculatorDataGen {resource.metadata.name}", resource.spec))
    if not specs:
        where = f" ({'; '.join(refs)}, defined elsewhere: plan that file)" if refs else ""
        raise ConfigError(f"{source}: no SpeculatorDataGen or spec.dataGen to plan{where}")
    runs = [_spec_run(label, spec, ranks.get(label, 1), allowed_roots) for label, spec in specs]
    return Planned(runs, trainings)


def _spec_run(label: str, spec: Any, trainer_ranks: int, allowed_roots: Sequence[str]) -> PlannedRun:
    from specops_operator.estimate import quantity_bytes

    workload = spec.model_dump(include=set(DataGenConfig.model_fields) - {"sync", "run"})
    config = DataGenConfig.model_validate(
        {
            **workload,
            "sync": {
                "kind": "disk",
                "path": "plan",
                "shard_size": spec.sync.shard_size,
                "max_broker_bytes": spec.sync.max_broker_bytes,
            },
            "run": {"allowed_roots": list(allowed_roots)},
        }
    )
    arch = spec.verifier_architecture
    limit = spec.broker.resources.limits.get("memory")
    return PlannedRun(
        label=label,
        config=config,
        writers=spec.shards * spec.workers,
        gpu=spec.pod.resources.gpus() > 0,
        online=spec.mode == "online",
        trainer_ranks=trainer_ranks,
        storage_bytes=quantity_bytes(spec.storage.size) if spec.storage and spec.storage.size else None,
        broker_limit_bytes=quantity_bytes(limit) if limit is not None else None,
        declared_shape=None
        if arch is None
        else VerifierShape(arch.num_layers, arch.hidden_size, arch.vocab_size, "spec.verifierArchitecture"),
    )


def _local_gpu(device: str) -> bool:
    if device != "auto":
        return device.startswith("cuda")
    import torch

    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------- the verifier's shape


def verifier_shape(run: PlannedRun) -> VerifierShape | str:
    """The verifier's dimensions, or why they are unknown. In order: the spec's
    verifierArchitecture, the table of common verifiers, the model's own config.json (a local
    directory, or the Hub's config.json alone)."""
    if run.declared_shape is not None:
        return run.declared_shape
    verifier = run.config.verifier
    known = known_shape(verifier)
    if known is not None:
        return VerifierShape(
            known.num_layers, known.hidden_size, known.vocab_size, f"known verifier {known.source}"
        )
    try:
        path = _config_json(verifier, run.config.run.allowed_roots)
    except (OSError, ValueError) as exc:
        return f"{exc} (set spec.verifierArchitecture, or plan where the verifier is reachable)"
    data = json.loads(path.read_text())
    text = data.get("text_config", data)
    return VerifierShape(
        int(text["num_hidden_layers"]), int(text["hidden_size"]), int(text["vocab_size"]), str(path)
    )


def _config_json(verifier: VerifierConfig, allowed_roots: Sequence[str]) -> Path:
    from specops.verifier import is_local, resolve_verifier

    if is_local(verifier.name_or_path):
        return Path(resolve_verifier(verifier, allowed_roots)) / "config.json"
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(verifier.name_or_path, "config.json", revision=verifier.revision))
    except Exception as exc:  # the client's many error types: all mean "not available here"
        raise ValueError(
            f"verifier.nameOrPath: config.json of {verifier.name_or_path!r} unavailable"
        ) from exc


# --------------------------------------------------------------------------- counting


@dataclass
class Counted:
    """What the sources yield once tokenized as generation tokenizes them."""

    examples: int = 0
    tokens: int = 0
    dropped: int = 0
    longest: int = 0
    per_writer: list[int] = field(default_factory=list)


def countable(config: DataGenConfig) -> str | None:
    """Why the sources cannot be counted here (None when they can)."""
    from specops.data.sources import looks_local

    remote = [i for i, s in enumerate(config.datasets) if s.kind == "hf" and not looks_local(s.path)]
    if remote:
        return f"datasets[{remote[0]}] is on the Hub"
    return None


def count(config: DataGenConfig, writers: int) -> Counted:
    """Examples and tokens of every slice, tokenized by generation's own code (with the
    dataset's answers: a `regenerate` stage would replace them with the verifier's)."""
    from specops.generate import GenerateReport, in_slice, tokenized_slice
    from specops.verifier import load_tokenizer

    whole = config.model_copy(
        update={"regenerate": None, "run": config.run.model_copy(update={"shard_index": 0, "num_shards": 1})}
    )
    tokenizer = load_tokenizer(config.verifier, config.run.allowed_roots)
    report = GenerateReport()
    counted = Counted(per_writer=[0] * writers)
    for example in tokenized_slice(whole, tokenizer, set(), report):
        length = len(example.token_ids)
        counted.examples += 1
        counted.tokens += length
        counted.longest = max(counted.longest, length)
        counted.per_writer[next(w for w in range(writers) if in_slice(example.id, w, writers))] += 1
    counted.dropped = report.dropped
    return counted


def even_split(examples: int, writers: int) -> list[int]:
    """Examples per writer when only the total is known (slices are equal hash ranges)."""
    base = examples // writers
    return [base + (1 if w < examples % writers else 0) for w in range(writers)]
