"""The Hugging Face PyTorch peer of `python -m research.benchmark --compare=hf_torch` (and
`--compare=hf_torch_compile`).

The same shapes as ours (layers, width, heads, MLP, vocabulary, batch, sequence, dropout)
through transformers' GPT2LMHeadModel (causal LM) or BertForPreTraining (BERT pretraining),
built from a config (nothing downloaded) with SDPA attention (attn_implementation="sdpa"):
forward, backward, gradient clipping to norm 1 and an AdamW step, timed per step like ours
(median). `prepare` builds and warms a peer up (`PeerRun`); on CPU research.benchmark times
its steps between ours (`Peers`, `PeerRun.timed_step`), `run_hf_torch` times one on its own.
(BertForPreTraining computes MLM logits at every position, ours only at the gathered ones;
GPT2LMHeadModel's loss covers T - 1 positions.)

Where torch.cuda.is_available() the peer runs on the GPU (cuda:0): float32 weights, the
compute in our compute dtype through torch.autocast('cuda', dtype=bfloat16 / float16) when
that is not float32 (no loss scaling; ours has none), fused AdamW, and steps timed pipelined
as ours are on an accelerator: queued back to back, a step's time the interval between CUDA
events recorded at the ends of consecutive steps. With float32 compute TF32 is allowed for matmuls and
cuDNN (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32): XLA on GPU runs
float32 dots in TF32 by default, so both sides get the same precision. Elsewhere (CPU) the
weights are cast to the compute dtype and torch uses every CPU thread.

`hf_torch_compile` wraps the model in torch.compile (default mode, inductor). It compiles in
the first warm-up step (at least one warm-up step runs), so the warm-up includes compilation
and the timed steps do not. On CPU inductor needs a C++ compiler; without one, or when the
compilation fails, a ConfigError says so (use --compare=hf_torch there).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from typing import Any, Callable, Iterator

import numpy as np

from research.errors import ConfigError

PEERS = ("hf_torch", "hf_torch_compile")
_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def parse_peers(text: str) -> list[str]:
    """argparse `type` of --compare: one peer or several, comma-separated, in order."""
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if n not in PEERS]
    if bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected {' or '.join(PEERS)}, or both comma-separated "
            f"(--compare={','.join(PEERS)})")
    return names


def _gpt2_peer(transformers, cfg, objective, ids, act: str, rng) -> tuple[Any, dict, str]:
    """HF GPT2LMHeadModel with the shapes of `cfg` (causal LM); (model, inputs, name)."""
    del objective, rng
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=max(cfg.max_len, ids.shape[1]), n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
        activation_function=act, resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.attention_dropout_rate, layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(hf_cfg), {"input_ids": ids, "labels": ids}, "GPT2LMHeadModel"


def _bert_peer(transformers, cfg, objective, ids, act: str, rng) -> tuple[Any, dict, str]:
    """HF BertForPreTraining with the shapes of `cfg`, MLM labels at P random positions per
    row and random NSP labels; (model, inputs, name)."""
    import torch
    batch_size, seq_len = ids.shape
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, hidden_act=act,
        hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate,
        max_position_embeddings=max(cfg.max_len, seq_len),
        type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    model = transformers.BertForPreTraining(hf_cfg)
    p = objective.max_predictions_per_seq
    labels = torch.full((batch_size, seq_len), -100, dtype=torch.int64)
    for row in range(batch_size):
        pos = rng.choice(np.arange(1, seq_len), size=min(p, seq_len - 1), replace=False)
        labels[row, pos] = ids[row, pos]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "token_type_ids": torch.ones_like(ids), "labels": labels,
              "next_sentence_label": torch.from_numpy(rng.integers(0, 2, batch_size))}
    return model, inputs, "BertForPreTraining"


def hf_peers() -> dict[type, Callable]:
    """{objective class: builder of its Hugging Face PyTorch peer}."""
    from research.objectives.bert_pretraining import BertPretrainingObjective
    from research.objectives.causal_lm import CausalLMObjective
    return {CausalLMObjective: _gpt2_peer, BertPretrainingObjective: _bert_peer}


def check_cpu_compiler(peer: str) -> None:
    """ConfigError unless torch inductor finds the C++ compiler it needs for CPU code."""
    try:
        from torch._inductor import cpp_builder
    except ImportError:  # a torch without this module: let the compilation itself decide
        return
    try:
        cpp_builder.get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - inductor raises several kinds for "no compiler"
        raise ConfigError(f"--compare={peer} on CPU needs a C++ compiler for torch.compile "
                          f"(inductor), and none was found ({str(err).strip().splitlines()[0]}); "
                          "install g++ or point CXX at one, or use --compare=hf_torch.") from None


def placement(torch, dtype: str) -> dict:
    """Where and in which precision the peer runs: {device, weights, autocast, tf32}.

    GPU (torch.cuda.is_available()): float32 weights, autocast to `dtype` unless float32; for
    float32, TF32 matmuls and cuDNN convolutions (set here, process-wide), as XLA's default
    float32 dot precision on GPU is TF32. CPU: weights in `dtype`, every CPU thread."""
    if dtype not in _TORCH_DTYPES:
        raise ConfigError(f"--compare: the peer has no torch dtype for {dtype!r}; drop --compare "
                          f"or use one of {', '.join(_TORCH_DTYPES)}.")
    if torch.cuda.is_available():
        tf32 = dtype == "float32"
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return {"device": "cuda:0", "weights": "float32",
                "autocast": None if dtype == "float32" else dtype, "tf32": tf32}
    torch.set_num_threads(os.cpu_count() or 1)
    return {"device": "cpu", "weights": dtype, "autocast": None, "tf32": False}


def _train_step(torch, model, forward, opt, inputs: dict, where: dict) -> Callable[[], Any]:
    """One peer step: zero grads, forward (under autocast on GPU when asked), backward, clip
    to norm 1, AdamW; returns the loss (not synchronized)."""
    autocast = where["autocast"]

    def step():
        opt.zero_grad(set_to_none=True)
        if autocast is not None:
            with torch.autocast("cuda", dtype=getattr(torch, autocast)):
                loss = forward(**inputs).loss
        else:
            loss = forward(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def _build(torch, transformers, cfg, objective, batch_size: int, seq_len: int, seed: int,
           peer: str) -> tuple[Any, dict, str]:
    """(model, inputs, name) of the peer of `objective` on the CPU; ConfigError if none."""
    peers = hf_peers()
    build = peers.get(type(objective))
    if build is None:
        raise ConfigError(f"--compare={peer} supports {', '.join(c.__name__ for c in peers)}, "
                          f"not {type(objective).__name__}; drop --compare for this run.")
    act = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}.get(cfg.activation)
    if act is None:
        raise ConfigError(f"--compare={peer}: no HF equivalent of activation {cfg.activation!r}; "
                          "drop --compare for this model.")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch_size, seq_len)).astype(np.int64))
    return build(transformers, cfg, objective, ids, act, rng)


@dataclasses.dataclass
class PeerRun:
    """A built and warmed-up peer: `step()` runs one training step (not synchronized on a GPU);
    `info` says how it runs (model, versions, device, precision, warm-up); `times` collects the
    seconds of its timed steps."""

    name: str
    step: Callable[[], Any]
    cuda: bool
    tokens_per_step: int
    info: dict
    times: list[float] = dataclasses.field(default_factory=list)

    def timed_step(self) -> float:
        """One blocking step on the CPU, timed and recorded (the interleaved comparison)."""
        t0 = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - t0)
        return self.times[-1]

    def result(self) -> dict:
        """`info` with the step times: median `step_time_s`, all of them, tokens/s."""
        step_time = float(np.median(self.times))
        return {**self.info, "step_time_s": step_time,
                "step_times_s": [float(t) for t in self.times],
                "tokens_per_sec": self.tokens_per_step / step_time}


class Peers:
    """The --compare peers of one benchmark, in order. On CPU `interleave` builds them after our
    warm-up and returns what steps each once, timed, between our timed steps; elsewhere
    `results` runs each on its own after ours (`run_hf_torch`)."""

    def __init__(self, names: list[str], run: dict, steps: int, warmup: int, seed: int):
        self.names, self.run, self.steps, self.warmup, self.seed = names, run, steps, warmup, seed
        self.prepared: dict[str, PeerRun] = {}

    def interleave(self, cfg, objective) -> Callable[[], None]:
        run = self.run
        for name in self.names:
            self.prepared[name] = prepare(cfg, objective, run["batch_size"], run["seq_len"],
                                          self.warmup, run["learning_rate"], self.seed, name)
        return lambda: [peer.timed_step() for peer in self.prepared.values()]

    def results(self, cfg, objective) -> Iterator[tuple[str, dict]]:
        """(name, the peer's timed run with `interleaved`) for each peer, in order."""
        run = self.run
        for name in self.names:
            if name in self.prepared:
                yield name, {**self.prepared.pop(name).result(), "interleaved": True}
                release(name)
            else:
                yield name, {**run_hf_torch(cfg, objective, run["batch_size"], run["seq_len"],
                                            self.steps, self.warmup, run["learning_rate"],
                                            self.seed, peer=name), "interleaved": False}


def report(result: dict, peer_name: str, peer: dict, steps: int) -> None:
    """Prints the peer's timed run `peer` next to ours and adds it to `peers` (with its MFU:
    our model FLOPs per step / its step time / our per-device peak, and our tokens/s over its);
    the first peer is also `compare` (and `compare_ratio`), the README table's peer."""
    peer["mfu"] = (result["model_flops_per_step"] / peer["step_time_s"]
                   / result["peak_flops_per_device"])
    ratio = result["tokens_per_sec"] / peer["tokens_per_sec"]
    print(f"{peer_name}: {describe(peer)}")
    warm = (f"; warm-up {peer['warmup']} step(s) {peer['warmup_s']:.1f} s, compilation included"
            if peer["compiled"] else "")
    print(f"{peer_name}: step {peer['step_time_s'] * 1e3:.1f} ms (median of {steps}), "
          f"{peer['tokens_per_sec']:.1f} tokens/s, MFU {100 * peer['mfu']:.1f}% (same model "
          f"FLOPs and peak as ours){warm}")
    print(f"ours / {peer_name} tokens/s: {ratio:.2f}x")
    entry = {"peer": peer_name, **peer, "ratio_tokens_per_sec": ratio}
    result.setdefault("peers", {})[peer_name] = entry
    if "compare" not in result:
        result["compare"], result["compare_ratio"] = entry, ratio


def run_hf_torch(cfg, objective, batch_size: int, seq_len: int, steps: int, warmup: int,
                 learning_rate: float, seed: int = 0, peer: str = "hf_torch") -> dict:
    """The same shapes through HF transformers' PyTorch model with an AdamW step (see the
    module docstring for device and precision); `peer` 'hf_torch_compile' adds torch.compile.
    Returns the step times (median `step_time_s`), tokens/s and how the peer ran. Afterwards
    the peer's memory is released (compiled graphs dropped, the CUDA cache emptied), so a
    second peer in the same process starts from the same place."""
    import torch
    try:
        run = prepare(cfg, objective, batch_size, seq_len, warmup, learning_rate, seed, peer)
        if run.cuda:
            run.times = _pipelined_times(torch, run.step, steps)
        else:
            for _ in range(steps):
                run.timed_step()
        return run.result()
    finally:
        release(peer)


def release(peer: str) -> None:
    """Frees what a finished peer held: compiled graphs (torch.compile), the CUDA cache."""
    import torch
    if peer == "hf_torch_compile":
        import torch._dynamo
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare(cfg, objective, batch_size: int, seq_len: int, warmup: int, learning_rate: float,
            seed: int = 0, peer: str = "hf_torch") -> PeerRun:
    """Builds the peer `peer` for our shapes, places it (`placement`) and runs its `warmup`
    untimed steps (at least one for torch.compile, which compiles in it)."""
    import torch
    import transformers

    if peer not in PEERS:
        raise ConfigError(f"--compare={peer}: pick one of {', '.join(PEERS)}.")
    compiled = peer == "hf_torch_compile"
    model, inputs, name = _build(torch, transformers, cfg, objective, batch_size, seq_len, seed,
                                 peer)
    where = placement(torch, cfg.compute_dtype.name)  # dtype "auto" resolved by JAX's backend
    if compiled and where["device"] == "cpu":
        check_cpu_compiler(peer)
    device = torch.device(where["device"])
    model = model.to(device=device, dtype=getattr(torch, where["weights"])).train()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01,
                            **({"fused": True} if device.type == "cuda" else {}))
    forward = torch.compile(model) if compiled else model
    step = _train_step(torch, model, forward, opt, inputs, where)
    warmup = max(warmup, 1) if compiled else warmup
    t0 = time.perf_counter()
    for i in range(warmup):
        if i == 0 and compiled:
            _run_first(step, peer)
        else:
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    info = {"model": name, "transformers": transformers.__version__, "torch": torch.__version__,
            "device": where["device"], "device_name": _device_name(torch, device),
            "weights_dtype": where["weights"], "autocast": where["autocast"],
            "tf32": where["tf32"], "compiled": compiled, "fused_adamw": device.type == "cuda",
            "attention": model.config._attn_implementation, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "warmup": warmup,
            "warmup_s": time.perf_counter() - t0, "warmup_includes_compile": compiled}
    return PeerRun(peer, step, device.type == "cuda", batch_size * seq_len, info)


def _pipelined_times(torch, step: Callable[[], Any], steps: int) -> list[float]:
    """Seconds per step on a CUDA device, timed as ours is there (research.benchmark
    `time_steps(pipelined=True)`): the host queues step after step without waiting, and a
    step's time is the interval between the CUDA events recorded at the ends of consecutive
    steps. The step has no host sync (clipping and fused AdamW stay on the device)."""
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    step()
    ends[0].record()
    for k in range(steps):
        step()
        ends[k + 1].record()
    torch.cuda.synchronize()
    return [ends[k].elapsed_time(ends[k + 1]) / 1e3 for k in range(steps)]


def _run_first(step: Callable[[], Any], peer: str) -> None:
    """The first step of a torch.compile'd peer (it compiles); a failed compilation becomes a
    ConfigError with its first line."""
    from torch._dynamo.exc import BackendCompilerFailed
    try:
        step()
    except BackendCompilerFailed as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--compare={peer}: torch.compile failed on this machine ({first}); "
                          "use --compare=hf_torch.") from None


def _device_name(torch, device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def describe(peer: dict) -> str:
    """One line on how the peer ran: model, device, precision, compilation."""
    precision = (f"{peer['weights_dtype']} weights"
                 + (f", {peer['autocast']} autocast" if peer["autocast"] else "")
                 + (", TF32 matmuls" if peer["tf32"] else ""))
    where = (peer["device_name"] if peer["device"] != "cpu"
             else f"cpu, {peer['threads']} threads")
    compiled = ("torch.compile (warm-up includes compilation)" if peer["compiled"]
                else "eager")
    return (f"{peer['model']} (torch {peer['torch']}, transformers {peer['transformers']}; "
            f"{where}; {precision}; {peer['attention']} attention; {compiled}; "
            f"{peer['params'] / 1e6:.1f}M params)")
