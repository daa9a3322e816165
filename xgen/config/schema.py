"""Typed configs behind every `conf/` group.

Hydra merges each group's YAML into these dataclasses, so a misspelt key or a
value of the wrong type fails at composition time, naming the key, instead of
deep inside JAX. Each dataclass is the only thing its home package reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from omegaconf import MISSING


# Choice fields: Hydra refuses any other value at composition, naming the key and the choices.
# StrEnum members equal their strings, so code compares them with plain strings.
class Remat(StrEnum):
    none = "none"
    full = "full"
    save_dots = "save_dots"


class AttentionKernel(StrEnum):
    dense = "dense"
    xla = "xla"
    chunked = "chunked"
    block_causal = "block_causal"
    splash = "splash"
    cudnn = "cudnn"


class ContextStrategy(StrEnum):
    all_gather = "all_gather"  # every device gathers the whole sequence's keys and values
    ring = "ring"  # keys and values pass around the context axis (xgen/model/ring.py)


class RopeType(StrEnum):
    """RoPE rules, named as transformers' `rope_type` (see xgen/model/rope.py)."""

    default = "default"
    linear = "linear"
    dynamic = "dynamic"
    yarn = "yarn"
    llama3 = "llama3"


class SpikePolicy(StrEnum):
    log = "log"
    skip = "skip"
    rollback = "rollback"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Platform(StrEnum):
    cpu = "cpu"
    gpu = "gpu"
    tpu = "tpu"


class PrepareEngine(StrEnum):
    local = "local"  # this machine's worker processes
    ray = "ray"  # Ray core tasks, on a running cluster or a local one


class Truncation(StrEnum):
    left = "left"  # keep the end
    right = "right"  # keep the start
    middle = "middle"  # keep both ends


class SandboxBackend(StrEnum):
    auto = "auto"  # bubblewrap where installed and not root, else xgen's own jail
    bubblewrap = "bubblewrap"
    namespaces = "namespaces"  # xgen's own jail (xgen/eval/sandbox_child.py)


class Scheduler(StrEnum):
    continuous = "continuous"  # rows join and leave the running batch at every decoding step
    static = "static"  # rows that arrive together run together to the longest one's end


class Packing(StrEnum):
    pack = "pack"
    pad = "pad"


class SFTFormat(StrEnum):
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    oasst = "oasst"
    dolly = "dolly"
    baize = "baize"
    scrolls = "scrolls"


@dataclass
class TaskConfig:
    """Which job `xgen.run` dispatches to (`xgen/tasks/<name>.py`)."""

    name: str = "pretrain"
    # task=pretrain_all: the stages to run in order, each starting from the one before.
    stages: list[str] = field(default_factory=list)


@dataclass
class RopeScalingConfig:
    """How rotary frequencies stretch past the length a model was trained at (part of the
    architecture: checkpoints store it). Keys are transformers' `rope_parameters` names,
    `original_max_positions` for `original_max_position_embeddings`."""

    # default (plain RoPE) | linear | dynamic (NTK) | yarn | llama3.
    type: RopeType = RopeType.default
    # The length multiplier (linear, dynamic, yarn, llama3).
    factor: float = 1.0
    # The length the model was pre-trained at (yarn, llama3; required by both).
    original_max_positions: Optional[int] = None
    # llama3: wavelengths above original / low_freq_factor are scaled, below original /
    # high_freq_factor kept, smoothed between (LLaMA 3.1: 1 and 4).
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn: the ramp between the dimensions turning beta_slow and beta_fast times over the
    # original length; cos and sin scaled by attention_factor (null: 0.1 ln(factor) + 1, or
    # the mscale / mscale_all_dim ratio where both are set); truncate rounds the ramp's ends.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True


# The RopeScalingConfig keys each rule reads (validation refuses any other set; HF import
# and export map exactly these).
ROPE_RULE_KEYS: dict[str, tuple[str, ...]] = {
    RopeType.default: (),
    RopeType.linear: ("factor",),
    RopeType.dynamic: ("factor",),
    RopeType.yarn: ("factor", "original_max_positions", "beta_fast", "beta_slow", "attention_factor", "mscale",
                    "mscale_all_dim", "truncate"),
    RopeType.llama3: ("factor", "original_max_positions", "low_freq_factor", "high_freq_factor"),
}  # fmt: skip


@dataclass
class ModelConfig:
    """LLaMA/XGen transformer dimensions (home: `xgen.model`)."""

    name: str = MISSING
    d_model: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    # Key/value heads; equal to n_heads for XGen/LLaMA-7B (multi-head attention).
    n_kv_heads: Optional[int] = None
    d_ff: int = MISSING
    vocab_size: int = 51200
    max_positions: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class ExecutionConfig:
    """How a model runs, apart from what it is (group `execution/`, home: `xgen.runtime`).

    Every command sets it (training, generation, evaluation, plan); checkpoints do not store
    it, so `task=eval execution.attention=chunked` runs a dense-trained model chunked."""

    name: str = "default"
    # Rematerialization of each block in the backward pass (memory for compute):
    # none | full (keep only block inputs) | save_dots (keep matmul outputs without batch dims).
    remat: Remat = Remat.none
    # Attention kernel: dense (einsum scores) | xla (jax.nn.dot_product_attention, XLA's) |
    # cudnn (the same with implementation=cudnn: cuDNN flash attention, GPUs, bf16) | chunked (blocks of `attention_chunk` queries, recomputed in
    # the backward pass: for long sequences without a fused kernel) | block_causal (block pairs
    # on and below the diagonal only, online softmax, a recomputing backward: about half of
    # chunked's attention FLOPs, memory of one block pair) | splash (Pallas TPU splash attention,
    # blocks of attention_chunk rounded to 128; interpret mode off a TPU: slow, for tests).
    # See xgen/model/attention.py.
    attention: AttentionKernel = AttentionKernel.dense
    attention_chunk: int = 1024
    # Context parallelism (hardware.mesh.context > 1): all_gather (each device gathers every
    # key and value of the sequence; one collective per layer) | ring (they pass around the
    # context axis in C steps: memory of one part, no splash). See docs/long-context.md.
    context_strategy: ContextStrategy = ContextStrategy.all_gather
    # Tokens per row whose output head and cross-entropy are computed at a time, each chunk
    # recomputed in the backward pass, so training never holds [batch, length, vocab]
    # float32 logits (2.1 GB for 8 x 8K tokens of XGen's 51,200-way head); 0: all at once.
    loss_chunk: int = 0
    # Blocks held stacked ([n_layers, ...] parameters) and run by lax.scan: the block compiles
    # once instead of n_layers times (MaxText's scan_layers); remat then applies per scanned
    # layer. Checkpoints keep the per-layer layout either way. null: scan models of 16 or
    # more layers (1b, xgen_7b), not tiny or small. See xgen/model/scan.py.
    scan_layers: Optional[bool] = None
    # dtype of matmul inputs (parameters stay float32); null: the hardware's, hardware.compute_dtype.
    compute_dtype: Optional[DType] = None
    # dtype of generation's KV caches; null: the compute dtype (half a float32 cache in bf16).
    kv_cache_dtype: Optional[DType] = None


@dataclass
class TokenizerConfig:
    """Which tokenizer to build (home: `xgen.tokenizer`)."""

    name: str = "xgen"


@dataclass
class RawInputConfig:
    """Where `task=prepare` reads a source's raw documents (home: `xgen.data.readers`)."""

    # Files or glob patterns; local paths or any fsspec URL (gs://... with gcsfs installed).
    paths: list[str] = field(default_factory=list)
    # jsonl | json (a JSON array, or lines) | parquet | text; None infers it from each file
    # name (.jsonl/.json/.parquet, under .gz/.zst/.bz2/.xz; anything else is text).
    format: Optional[str] = None
    # Address of the text in a record (see `meta`). null (data_mix=files): found from a
    # sample of the files before they are prepared: the one string field of a usual name for
    # text (text, content, code, ...: xgen.data.prepare.TEXT_FIELDS), or the only string
    # field; anything else is an error listing the fields. Logged, and kept in the manifest.
    text_field: Optional[str] = "text"
    # Metadata kept per document: stored name -> address. An address is a dotted path into
    # the record (`meta.redpajama_set_name`), `[]` maps over a list (`meta.language[].name`),
    # and `path:N` is the Nth folder of the file's path below the pattern's fixed prefix
    # (`path:-2`: the folder holding the file). List values are kept as lists.
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class SourceConfig:
    """One corpus of a mixture (home: `xgen.data`)."""

    # `python_docs`: pydoc_data.topics prose; `python_stdlib`: the interpreter's own .py files;
    # `prepared`: shards written by `task=prepare` under `path`.
    kind: str = MISSING
    weight: float = MISSING
    path: Optional[str] = None
    # For `prepared` sources: the raw files that `task=prepare` tokenizes into `path`.
    raw: Optional[RawInputConfig] = None
    # Keep at most this many documents (chosen by the data seed); None keeps all.
    max_documents: Optional[int] = None
    # Licenses allowed (metadata field `license`; a list value passes when any element is
    # allowed). null: no license filter (data already filtered, as StarCoderData is). A list
    # over data without license metadata is an error, never an empty part.
    licenses: Optional[list[str]] = None
    # Keep only documents whose metadata field has one of these values (any element of a
    # list value): {subset: [RedPajamaC4, RedPajamaBook]} selects SlimPajama subsets.
    where: dict[str, list[str]] = field(default_factory=dict)
    # Split the source by this metadata field and weight each part by its share of the
    # source's tokens in the manifest (StarCoder's per-language weights).
    weight_by: Optional[str] = None
    # A part (or the whole source) that filters leave empty is an error; true skips it,
    # logged and recorded in data_mix.json, and the other parts take its share.
    allow_empty: bool = False


@dataclass
class DataMixConfig:
    """A mixture of sources with sampling proportions (home: `xgen.data`)."""

    name: str = MISSING
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    # Files, folders or glob patterns for a mix whose source reads them as
    # `raw.paths: ${data_mix.paths}` (data_mix=files: `data_mix.paths='[my/*.jsonl.gz]'`);
    # set for a mix that does not read them, it is an error, never ignored.
    paths: list[str] = field(default_factory=list)
    # Their text field (`raw.text_field: ${data_mix.text_field}`); null: found.
    text_field: Optional[str] = None
    # Raw sources not prepared (or changed since) are prepared when a training run starts,
    # instead of refused: for your own files. Off for the report's corpora, which
    # task=prepare tokenizes on workers or a cluster.
    prepare_on_use: bool = False
    # Documents with fewer tokens are dropped (the report's rule).
    min_doc_tokens: int = 100
    seed: int = 0
    # Stage name -> token budget: the data is shuffled once, then split into disjoint chunks
    # in these proportions, one per sub-stage (the report's 2K/4K/8K split). A stage not
    # named in a split is refused for pre-training (it would read the other stages' chunks);
    # null: no split, every stage reads all of the data (a mix that includes a split mix,
    # as stage 2's include stage 1's, clears it with null: `{}` would merge and keep it).
    stage_split: Optional[dict[str, float]] = field(default_factory=dict)
    # Attention never crosses a document boundary (segment ids and positions per document).
    # Off by default, as the report: documents are concatenated and attend across EOT.
    document_masking: bool = False
    # Share of each source's documents held out of training for the held-out loss
    # (`trainer.eval_every`), chosen by a hash of each document's tokens: the same documents
    # whatever prepared them and however often (xgen/data/heldout.py). 0: none.
    heldout_share: float = 0.005
    # Largest relative difference between a source's sampling weight (after empty parts and
    # grain's integer proportions) and its configured share before start-up fails.
    weight_tolerance: float = 0.02

    def __post_init__(self):
        if self.stage_split is None:  # null clears an included mix's split: no split
            self.stage_split = {}


@dataclass
class StageConfig:
    """One pre-training stage: sequence length and token budget (home: `xgen.train`)."""

    name: str = MISSING
    seq_len: int = MISSING
    # Tokens per optimizer step; the batch is batch_tokens // seq_len sequences.
    batch_tokens: int = MISSING
    # The stage's token budget from the report (tokens, not steps).
    token_budget: int = MISSING
    # The stage whose final checkpoint this one starts from (None: from scratch).
    init_from_stage: Optional[str] = None


@dataclass
class OptimizerConfig:
    """AdamW with warmup then cosine decay (home: `xgen.train.optimizer`)."""

    name: str = "adamw"
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 2000
    # Cosine length in steps; None means the run's `trainer.steps`.
    decay_steps: Optional[int] = None
    # The learning rate decays to this fraction of the peak.
    min_lr_ratio: float = 0.1
    # dtype of Adam's first moment (bfloat16 halves its memory); the second stays float32.
    mu_dtype: DType = DType.float32


# Logical axis -> mesh axes (MaxText style). A mesh axis is used at most once per array:
# activations [batch, length, embed] shard batch over data+fsdp, length over context
# (context parallelism; a mesh axis of 1 by default) and leave embed whole, while
# parameters [embed, mlp] shard embed over fsdp (ZeRO-3) and mlp over tensor.
DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ["data", "fsdp"]),
    ("length", "context"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),  # scanned layers' stacked axis (execution.scan_layers): whole on every device
)


@dataclass
class MeshConfig:
    """Device mesh axis sizes; -1 takes the devices left over (home: `xgen.parallel`)."""

    data: int = 1
    fsdp: int = -1
    # Context parallelism: each sequence split over this many devices (the `length` axis of
    # activations; attention gathers keys and values over it, see xgen/model/context_parallel.py).
    context: int = 1
    tensor: int = 1


@dataclass
class HardwareConfig:
    """The machine: devices, mesh, precision and the figures MFU and carbon need."""

    name: str = MISSING
    platform: Platform = MISSING
    device_kind: str = MISSING  # e.g. "TPU v4", "H100"
    num_devices: int = MISSING  # chips in the whole job
    # Cloud TPU accelerator type for launchers (counts TensorCores: v4-1024 is 512 chips).
    accelerator_type: Optional[str] = None
    # Virtual CPU devices (sets XLA_FLAGS before JAX starts); None leaves XLA alone.
    host_device_count: Optional[int] = None
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # Multi-host: start JAX's multi-controller runtime (jax.distributed.initialize). On a TPU
    # pod or under SLURM it finds its peers from the environment; elsewhere give the
    # coordinator (host:port), the number of processes and this process's id.
    distributed: bool = False
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    # Logical axis name -> mesh axes; the one table that decides all placement.
    logical_axis_rules: list[Any] = field(default_factory=lambda: [list(r) for r in DEFAULT_AXIS_RULES])
    # The chip's matmul dtype: what `execution.compute_dtype` is unless a command sets it.
    compute_dtype: DType = DType.float32
    # TPU slices: the topology that `task=plan` compiles for ahead of time (libtpu's names).
    tpu_topology: Optional[str] = None  # e.g. "v4:8x8x8"
    tpu_chip_config: str = "megacore"
    tpu_chips_per_host: list[int] = field(default_factory=lambda: [2, 2, 1])
    tpu_wrap: list[bool] = field(default_factory=lambda: [False, False, False])
    # The chip's stated peak (dense matmuls in compute_dtype) that MFU divides by; None: no
    # MFU is reported (a measured or guessed peak would make a number that only looks like it).
    peak_flops_per_chip: Optional[float] = None
    memory_per_chip_bytes: Optional[int] = None
    # HBM bandwidth, bytes/s: with the peak FLOP/s, task=plan's roofline of the compiled step.
    memory_bandwidth_per_chip: Optional[float] = None
    chip_power_w: Optional[float] = None
    pue: float = 1.1


@dataclass
class SpikeConfig:
    """Online loss-spike detection (home: `xgen.train.step`).

    A step is a spike when its loss or gradient norm is more than `threshold` standard
    deviations above its running mean (exponential, `decay`), after `warmup_steps` steps.
    `log` records it; `skip` also drops the update; `rollback` restores the last checkpoint
    and goes on with the batches after the spike (a run under it saves its starting state,
    so there is always one). Non-finite losses or gradients never
    reach the parameters, whatever the policy."""

    policy: SpikePolicy = SpikePolicy.log
    threshold: float = 6.0
    decay: float = 0.99
    warmup_steps: int = 50
    # rollback: how many times in a row the run may go back to one checkpoint; a spike that
    # comes back after its batches were skipped is not the data's, and the run stops in one line.
    max_rollbacks: int = 3


class WandbMode(StrEnum):
    online = "online"  # streams to the W&B server as the run goes (needs `wandb login`)
    offline = "offline"  # writes <run dir>/wandb/ only; `wandb sync` uploads it later
    disabled = "disabled"  # W&B's no-op run: nothing written anywhere


@dataclass
class TensorBoardConfig:
    """TensorBoard event files in <run dir>/tensorboard through tensorboardX (extra `tensorboard`)."""

    # Seconds between flushes of the event file (tensorboardX's flush_secs).
    flush_secs: int = 30


@dataclass
class WandbConfig:
    """A Weights & Biases run (extra `wandb`), named as Levanter's WandbConfig: `wandb.init`'s
    arguments. The run id is kept in <run dir>/wandb_id, so a restarted or resumed run
    continues the same W&B run."""

    project: str = "xgen"
    entity: Optional[str] = None  # None: the login's default entity
    name: Optional[str] = None  # None: the run directory's last two parts (pretrain/<time>)
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None
    notes: Optional[str] = None
    # offline by default: a run never waits on, or fails for, a server; `wandb sync
    # <run dir>/wandb/offline-run-*` uploads it. online streams live (after `wandb login`).
    mode: WandbMode = WandbMode.offline
    # Upload the launching script's source (W&B's save_code); provenance.json already names the commit.
    save_code: bool = False
    # The W&B run id; None: the one in <run dir>/wandb_id, or a new random one written there.
    id: Optional[str] = None


@dataclass
class TrackerConfig:
    """Where train and eval scalars are mirrored besides metrics.jsonl and eval.jsonl (which
    are always written; home: `xgen.train.trackers`). Chosen as `tracker=tensorboard`,
    `tracker=wandb` or `tracker=[tensorboard,wandb]`; a tracker left out is None."""

    tensorboard: Optional[TensorBoardConfig] = None
    wandb: Optional[WandbConfig] = None


@dataclass
class TrainerConfig:
    """Run length, cadence and output (home: `xgen.train.loop`)."""

    # Steps of this stage; None runs the stage's token budget (token_budget // batch_tokens).
    # A stage that starts from another's checkpoint continues its step count.
    steps: Optional[int] = None
    # Start from this run directory's newest checkpoint (model, optimizer, step; not the data
    # position) when the run's own directory has none: how a stage starts from the last.
    init_from: Optional[str] = None
    # With init_from: start the optimizer state afresh (the step count, and so the learning
    # rate schedule, still continues).
    reset_optimizer: bool = False
    # After reset_optimizer: ramp the rate up linearly over this many steps (0: no new warmup).
    rewarm_steps: int = 0
    # Take only the parameters from init_from: a fresh optimizer and step 0 (fine-tuning;
    # MaxText's load_parameters_path). Parameters-only checkpoints (import_hf) always do.
    init_params_only: bool = False
    log_every: int = 10
    checkpoint_every: int = 0  # 0: none by step count (see checkpoint_minutes)
    # Also a checkpoint when this many minutes have passed since the last one (0: off), decided
    # on process 0's clock and shared, so every host saves the same step. With the default, a
    # crash of any kind loses at most half an hour (Levanter's default is 15 minutes).
    checkpoint_minutes: float = 30.0
    # The hang watchdog: no step finished within this many minutes (the first step's compile
    # excluded) writes every thread's stack to the run log and exits 124, so that a supervisor
    # (python -m xgen.launch) restarts the run. 0: off.
    step_timeout_minutes: float = 30.0
    checkpoints_to_keep: int = 3
    # Also keep every checkpoint whose step is a multiple of this (None: only the last K).
    checkpoints_keep_every: Optional[int] = None
    # Micro-batches per optimizer step: the stage's batch is split and gradients summed,
    # for batches that do not fit in memory at once.
    grad_accum_steps: int = 1
    # Keys (or prefixes: optimizer) a resume may change from the checkpoint's config; any other
    # run-defining difference is refused (xgen/train/resume.py). Allowed changes go to events.jsonl.
    allow_changes: list[str] = field(default_factory=list)
    # The held-out loss (data_mix.heldout_share's documents, per source and in total) every
    # this many steps and at the end, on the parameters in memory, sharded like the train
    # step and compiled once; in eval.jsonl and the trackers. 0: off.
    eval_every: int = 0
    # Batches of the stage's shape per source for one held-out evaluation (fewer when a
    # source holds out fewer tokens; the same batches every time).
    eval_batches: int = 4
    # Log-likelihood benchmarks run on the parameters in memory every `eval_tasks_every`
    # steps (0: off) and at the end: names of `eval/` configs (zeroshot, mmlu_0shot,
    # mmlu_5shot). The one named like this command's `eval` group runs with its `eval.*`
    # settings, the others with their file's; `eval_tasks_limit` caps each task's items.
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_every: int = 0
    eval_tasks_limit: Optional[int] = None
    # [first, last]: a jax.profiler trace of these steps in <run dir>/profile (TensorBoard's
    # profile plugin, or Perfetto: profile/**/perfetto_trace.json.gz). []: none.
    profile_steps: list[int] = field(default_factory=list)
    spike: SpikeConfig = field(default_factory=SpikeConfig)


@dataclass
class LoaderConfig:
    """How batches are read (home: `xgen.data.loader`): grain's read threads and prefetch."""

    # Threads that build batches ahead of the train step (grain's ReadOptions.num_threads).
    read_threads: int = 2
    # Batches built ahead; each holds batch_tokens tokens (grain's prefetch_buffer_size).
    prefetch_batches: int = 4
    # Record which sequences (their index in the mixture) each step trained on, per process,
    # in data_trace/process-<p>.jsonl: to audit a run's data order across restarts and
    # changes of process count, or to find the batch behind a loss spike.
    trace_sequences: bool = False


@dataclass
class PrepareConfig:
    """`task=prepare`: tokenizing raw sources into shards (home: `xgen.data.prepare`)."""

    # Where the work units run: `local` (this machine's processes; no cluster needed) or
    # `ray` (Ray core tasks: `pip install 'xgen[ray]'`). Either gives byte-identical output.
    engine: PrepareEngine = PrepareEngine.local
    # Units run at once: worker processes (`local`; 0 runs them in this process) or Ray
    # tasks in flight (`ray`; a local Ray started by the task gets this many CPUs).
    workers: int = 2
    # `ray`: the address of a running cluster (`auto`, `ray://head:10001`, `10.0.0.1:6379`);
    # null starts a local Ray for this task and stops it after.
    ray_address: Optional[str] = None
    # A failed or lost unit (a worker killed, a node preempted) is run again this many times
    # before the prepare fails; its partial output is never used.
    retries: int = 3
    # Uncompressed JSON Lines files larger than this are cut into line-aligned byte ranges,
    # each its own unit (a restart redoes one range, not the file). Part of the prepared
    # data's identity: changing it means preparing into a new directory.
    split_bytes: int = 256 * 1024 * 1024
    # List the corpus and estimate its tokens and hours from a sample, without preparing.
    dry_run: bool = False
    # Bytes read (decompressed) from each sampled file for the dry run's estimates.
    sample_bytes: int = 4 * 1024 * 1024
    # Cores the dry run's time estimate is given for (besides this machine's).
    plan_cores: list[int] = field(default_factory=lambda: [64, 512])
    # Documents sent to a worker at a time.
    batch_documents: int = 256
    # A new shard starts after this many tokens.
    shard_tokens: int = 50_000_000
    # Metadata fields whose per-value token counts go into the manifest (for `weight_by`);
    # keep to low-cardinality fields.
    count_tokens_by: list[str] = field(default_factory=lambda: ["language", "license", "source", "subset"])


@dataclass
class PlanConfig:
    """`task=plan`: the MFU at which step time and throughput are projected, and what it
    compiles besides the train step (the decoding step; presets when the step does not fit)."""

    mfu: float = 0.45
    # TPU slices: also compile the Engine's decoding step (serve.max_batch rows over a full
    # KV cache) and report its per-chip memory.
    generate: bool = True
    # Read bandwidth of checkpoint storage per host, bytes/s, for the recovery estimate (the
    # time to restore after a failure); 1 GB/s is a cautious figure for a GCS bucket.
    storage_bytes_per_s: float = 1.0e9
    # TPU slices: when the step does not fit, compile it with these `execution/` presets, most
    # memory saved first (those before the command's own), until one fits, and name it with
    # its per-chip memory as an override to add; [] tries none (xgen/tasks/plan_advice.py).
    presets: list[str] = field(default_factory=lambda: ["tpu_splash", "memory_saving", "default"])


@dataclass
class SFTSourceConfig:
    """One instruction dataset on local disk (home: `xgen.sft.formats`)."""

    # alpaca (instruction/input/output) | sharegpt (conversations from/value) | oasst
    # (the highest-ranked path of each message tree: the trees export, or message rows as on
    # Hugging Face, linked by parent_id) | dolly (instruction/context/response) |
    # baize ([|Human|]/[|AI|] dialogues) | scrolls (input/output long-document tasks)
    format: SFTFormat = MISSING
    paths: list[str] = field(default_factory=list)  # files or globs: .json, .jsonl(.gz), .parquet
    # Keep only conversations of at least this many tokens (SCROLLS: 4,000 in the report).
    min_tokens: int = 0
    # Sample this many of the kept conversations (seeded); None: all.
    max_examples: Optional[int] = None


@dataclass
class SFTConfig:
    """Supervised fine-tuning data and its packing (group `sft/`, home: `xgen.sft`)."""

    name: str = MISSING
    sources: dict[str, SFTSourceConfig] = field(default_factory=dict)
    # pack: several conversations per sequence, attention kept inside each (segment ids and
    # positions); pad: one conversation per sequence.
    packing: Packing = Packing.pack
    # Prepend `chat_template.system` to conversations that bring no system message.
    system_header: bool = True
    epochs: float = 3.0
    seed: int = 0
    # Conversations held out (seeded) to measure the loss on unseen response tokens.
    heldout: int = 0


@dataclass
class SandboxConfig:
    """Limits for running generated programs (HumanEval; home: `xgen.eval.sandbox`)."""

    timeout_s: float = 10.0  # wall clock per program
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    workers: int = 2  # programs run at once
    disk_mb: int = 64  # the jail's /box: the only place a program can write
    # The jail: auto (bubblewrap where `bwrap` is installed and xgen is not root, else xgen's
    # own from the kernel's namespaces; see xgen/eval/sandbox.py), bubblewrap, or namespaces.
    backend: SandboxBackend = SandboxBackend.auto


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat endpoint that grades answers (home: `xgen.eval.judge`):
    `task=serve` gives one locally; a hosted model when you have one."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4"
    # Name of the environment variable that holds the API key (never the key itself).
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 120.0
    retries: int = 3
    workers: int = 4  # requests in flight at once
    # Every judgement is cached here, keyed by judge model and request: reruns cost nothing.
    cache_dir: str = "${data_dir}/judge_cache"


@dataclass
class EvalConfig:
    """A benchmark for `task=eval` (group `eval/`, home: `xgen.eval`). Settings a benchmark
    does not use are ignored by it; each `conf/eval/*.yaml` sets the ones it reads."""

    name: str = MISSING
    # mmlu | zeroshot | humaneval | ppl_by_position | passkey | summarization | longform_qa | mt_bench | alpaca_eval
    kind: str = MISSING
    data_path: str = MISSING  # the benchmark's files, in their public layout
    shots: int = 0
    # Sub-tasks to run; empty: all of the kind's. zeroshot: arc_challenge, hellaswag, winogrande,
    # truthfulqa_mc, boolq, piqa, openbookqa; summarization: ami, forever_dreaming, tv_mega_site.
    tasks: list[str] = field(default_factory=list)
    batch_size: int = 8  # sequences per forward pass
    limit: Optional[int] = None  # items per task or subject, for quick runs
    # A split without items (or MMLU dev rows fewer than `shots`) is an error unless true.
    allow_empty: bool = False
    # Log-probs normalized over every row of the output head (51,200 for XGen), as
    # lm-evaluation-harness's hf backend and the training loss compute them; false: over the
    # tokenizer's ids only (the padding rows masked, as sampling always does).
    normalize_over_all_rows: bool = True
    # Sampling, for benchmarks that generate (humaneval, summarization, judged evals).
    n_samples: int = 1  # per problem (HumanEval pass@k: the report's n=200)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    pass_k: list[int] = field(default_factory=lambda: [1])
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    # Longest input in tokens (None: what the model's context leaves after max_new_tokens) and
    # which side of a longer input is dropped: left (keep the end) | right | middle.
    max_input_tokens: Optional[int] = None
    truncation: Truncation = Truncation.left
    # ppl_by_position: checkpoints to compare (empty: `checkpoint`), documents of at least
    # min_tokens tokens, scored over their first min_tokens positions.
    checkpoints: list[str] = field(default_factory=list)
    min_tokens: int = 8192
    # passkey: prompt lengths in tokens, depths of the key in the filler (0: start, 1: end),
    # and trials per (length, depth) cell, each with its own 5-digit key (drawn from `seed`).
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 5
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # Pairwise judging (alpaca_eval): the reference answers' file.
    reference_path: Optional[str] = None


@dataclass
class CarbonConfig:
    """`task=carbon`: energy and emissions of a run (the report's Section 6; home: `xgen.tasks.carbon`)."""

    # Chip-hours; None: measured from `run_dir` (summary.json wall time x chips), or planned
    # from its plan.json (tokens / tokens per second x chips).
    chip_hours: Optional[float] = None
    chip_power_w: Optional[float] = None  # None: hardware.chip_power_w
    pue: Optional[float] = None  # None: hardware.pue
    # Grid carbon intensity in tCO2eq per MWh (the report's figure).
    tco2_per_mwh: float = 0.079
    # Tokens to train, for an estimate from plan.json; None: the stage's token budget.
    tokens: Optional[int] = None


@dataclass
class DiffConfig:
    """`task=diff`: the two configs to compare, each a run directory, a snapshot (a name in
    snapshots/ or a YAML path) or None, the config this command composes (home: `xgen.tasks.diff`)."""

    a: Optional[str] = None
    b: Optional[str] = None
    # Print the differences as one JSON object instead of lines.
    json: bool = False


@dataclass
class HFConfig:
    """Hugging Face export settings for `task=export_hf` (home: `xgen.hf`)."""

    # Safetensors shard size: export holds about one shard in host memory.
    max_shard_bytes: int = 2_000_000_000


@dataclass
class ChatTemplateConfig:
    """How a conversation becomes text: XGen-7B-Inst's format, shared by SFT, `task=chat` and
    the server so that training and inference never disagree (home: `xgen.generate.chat`).

    A conversation renders as `system` then, per turn, `human.format(content=...)` or
    `assistant_prefix + content + end`; a prompt for the model ends with `assistant_prefix`."""

    system: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.\n\n"
    )
    human: str = "### Human: {content}\n"
    assistant_prefix: str = "### Assistant:"
    # Appended after every assistant turn in training; the sampler stops on it (end of text).
    # In SFT data it is the only control token: special-token strings inside a conversation
    # (this one included) are tokenized as plain text, as in pre-training.
    end: str = "<|endoftext|>"
    # Generation also stops at the next turn's marker.
    stop: list[str] = field(default_factory=lambda: ["### Human:"])


@dataclass
class SamplingConfig:
    """One request's sampler settings: what the Engine takes per prompt (home: `xgen.generate`)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop: list[str] = field(default_factory=list)  # strings that end a completion (not included)
    seed: int = 0


@dataclass
class GenerateConfig(SamplingConfig):
    """`task=generate|chat|serve`: the sampler settings of every request, and the cache size."""

    # Longest prompt + completion the KV cache holds; None: the model's max_positions.
    max_len: Optional[int] = None


@dataclass
class ServeConfig:
    """The OpenAI-compatible HTTP server of `task=serve` (home: `xgen.serve`; docs/serving.md)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "xgen"
    scheduler: Scheduler = Scheduler.continuous
    # Rows decoded together: the continuous scheduler's cache slots, the static one's batch.
    max_batch: int = 8
    # continuous: prompt tokens a newcomer's prefill runs per decoding step (bounds the stall
    # of the running rows; a multiple of 16).
    prefill_chunk: int = 128
    # static: how long the batcher waits for more requests before running a batch, in ms.
    batch_wait_ms: float = 5.0
    # Rows waiting for a slot; a request that would queue more is answered 429.
    max_queued_rows: int = 4096
    max_body_bytes: int = 16 * 2**20
    # On SIGTERM: new requests get 503, running and queued rows get this long to finish,
    # then their streams end with an error event and `data: [DONE]`.
    shutdown_grace_s: float = 30.0
    # continuous: while other requests wait for a slot, one request keeps at most this
    # fraction of max_batch (at least one row); the rest of its rows (n choices, prompts)
    # leave their slots, keeping their tokens, for the waiting requests. Alone, a request
    # uses every slot. 1.0: off (a request of n=16 could hold all 8 slots for its whole run).
    max_request_share: float = 0.5
    # A stream's chunks generated but not sent because its client is not reading (beyond
    # the socket's buffers); when this many wait, its rows stop and give their slots to
    # waiting requests, and they resume once the client has read half of them.
    stream_buffer_chunks: int = 512
    # A connection with no request under way (new and silent, or kept alive between
    # requests) is closed after this long, in seconds (uvicorn's keep-alive default).
    idle_timeout_s: float = 5.0
    # A request's line, headers and body must all arrive within this long of its first
    # byte, or it is answered 408 and closed (a Content-Length larger than the body sent,
    # a request trickled a byte at a time); 16 MiB bodies need 2.2 Mbit/s at the default.
    read_timeout_s: float = 60.0
    # A client that takes nothing of its answer for this long is disconnected and its
    # request cancelled (a stream nobody reads).
    stall_timeout_s: float = 30.0
    # Open connections at most; one more is answered 503 at once and closed. 0: what the
    # open-file limit (`ulimit -n`) leaves after the descriptors in use and a reserve, the
    # most that can be served without accept() failing; a larger value is lowered to it.
    max_connections: int = 0
    # A warning repeated by many connections (the same message) is logged once per this
    # many seconds, then one line with how many were left out; 0 logs every one.
    log_repeat_s: float = 10.0


@dataclass
class XGenConfig:
    """The whole run: one field per `conf/` group plus run-wide settings."""

    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    execution: ExecutionConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    data_mix: DataMixConfig = MISSING
    stage: StageConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    hardware: HardwareConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Root of prepared and raw data; data_mix paths interpolate it.
    data_dir: str = "data"
    # An earlier run's directory, for tasks that read one (plot).
    run_dir: Optional[str] = None
    seed: int = 0
    # Inference and conversion (task=generate|chat|serve|export_hf|import_hf): the model to
    # load (a run directory, its checkpoints/ folder, or a Hugging Face model directory),
    # where to write, the Hugging Face directory to import, and a prompt.
    checkpoint: Optional[str] = None
    out: Optional[str] = None
    hf_path: Optional[str] = None
    prompt: Optional[str] = None
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    chat_template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    hf: HFConfig = field(default_factory=HFConfig)
    sft: Optional[SFTConfig] = None
    eval: Optional[EvalConfig] = None
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    diff: DiffConfig = field(default_factory=DiffConfig)
