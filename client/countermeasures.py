"""Ranked countermeasures for a bottleneck, each with its expected effect worked out from the measurements.

`gain` is the expected fraction of the binding time removed (0..1), an estimate used only for ranking; the
`effect` text says how it was estimated so the reader can judge it. KV-cache reuse is ranked from the share of
prompt blocks the bench's prompts repeat (prompt_prefix_hit_rate), and not offered when it is already on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Countermeasure:
    action: str
    effect: str
    gain: float


REUSE = "KV-cache reuse (serve.enable_kv_cache_reuse)"


def _reuse_on(run: dict[str, Any], ref) -> bool:
    looked_up = (run.get("kv_cache_reused_blocks") or 0) + (run.get("kv_cache_missed_blocks") or 0)
    return bool(looked_up) or bool(ref is not None and ref.kv_cache_reuse)


def _reuse(run: dict[str, Any], ref, share: float, what: str) -> list[Countermeasure]:
    """Enable KV-cache reuse, with `share` (of the binding time) times the prompts' measured prefix hit rate."""
    if _reuse_on(run, ref):
        return []
    hit = run.get("prompt_prefix_hit_rate")
    if hit is None:
        return [Countermeasure(REUSE, "gain unknown: these bench results do not say how much the prompts share "
                                      "(rerun `enginesmith bench`)", 0.0)]
    return [Countermeasure(REUSE, f"{hit:.0%} of the prompt blocks repeat an earlier prompt's prefix (measured on "
                                  f"the bench's prompts): {what} -{hit:.0%}", share * hit)]


def _queueing(resource: str, run: dict[str, Any], sp, pr, ref) -> list[Countermeasure]:
    q_ms, share = 1e3 * sp.queue_s, sp.share("queue")
    active = max(pr.mean_active, 1.0) if pr.samples else max(1.0, run["request_throughput"] * (sp.e2e_s - sp.queue_s))
    offered = (run["load_value"] if run.get("load_mode") == "rate" and isinstance(run.get("load_value"), (int, float))
               else run.get("max_concurrency") or active)
    if run.get("load_mode") == "rate" and isinstance(offered, (int, float)) and not math.isinf(offered):
        replicas = max(2, math.ceil(offered / max(run["request_throughput"], 1e-9) * 1.2))
        why = f"offered {offered:g} req/s vs {run['request_throughput']:.2f} req/s served"
    else:
        replicas = max(2, math.ceil(float(offered) / active))
        why = f"{offered} requests in flight vs {active:.1f} running at once"
    out = [Countermeasure(f"more replicas (x{replicas}) behind a load balancer",
                          f"{why}: queueing ({q_ms:.0f} ms/request, {share:.0%} of E2E) should fall to ~0", share)]
    waiting = max(pr.max_waiting, 1.0)
    admit = min(1.0, active / waiting)
    if resource == "KV capacity":
        if ref is None or ref.kv_cache_dtype != "fp8":
            out.append(Countermeasure("FP8 KV cache (quantization.kv_cache: fp8)",
                                      f"KV capacity x2: ~{active:.0f} more sequences admitted of {waiting:.0f} "
                                      f"waiting; queueing -{admit:.0%}", share * admit))
        out.append(Countermeasure("more TP (parallel.tp_size x2)",
                                  "weights and KV per GPU halve, so KV capacity more than doubles; decode step "
                                  "also shortens (minus the all-reduce cost)", share * admit * 0.9))
        out.append(Countermeasure("batch_scheduler_policy: max_utilization",
                                  "admits by blocks in use instead of reserving isl+osl per request up front; "
                                  "more sequences fit, at the risk of pausing some", share * admit * 0.5))
        isl = sum(run.get("input_lens") or [0]) / max(1, len(run.get("input_lens") or []))
        osl = sum(run.get("output_lens") or [0]) / max(1, len(run.get("output_lens") or []))
        prompt_share = isl / (isl + osl) if isl + osl else 0.0  # the part of a sequence's KV that can be shared
        out += _reuse(run, ref, share * admit * prompt_share, "KV blocks of the prompts")
    elif resource == "batch slots":
        mb = int(pr.max_batch) or (ref.max_batch_size if ref else 0)
        out.append(Countermeasure(f"raise build.max_batch_size (now {mb}) to >= {int(pr.max_waiting + pr.mean_active)}",
                                  "continuous batching then runs the waiting requests too, if KV allows; TPOT "
                                  "rises slowly with batch while decode is HBM-bound", share * 0.9))
    else:
        out.append(Countermeasure("admission control (serve.max_queue_size)",
                                  "bounds queueing time by rejecting early instead of timing out late", share * 0.3))
        out.append(Countermeasure("chunked context (serve.enable_chunked_context)",
                                  "prefill chunks share steps with decode: running requests keep streaming "
                                  "while new ones are admitted", share * 0.2))
    return out


def _decode(resource: str, sp, dec, ref) -> list[Countermeasure]:
    share = sp.share("decode")
    out = []
    if dec is not None and ref is not None and resource in ("HBM bandwidth", "software overhead"):
        nbytes = dec.achieved * dec.measured_s
        w = min(1.0, ref.pp_size * ref.weight_bytes / nbytes) if nbytes else 0.0
        kv = 1.0 - w
        hw = dec.hbm_s / dec.floor_s if dec.floor_s else 0.0
        if ref.weights_quant == "none":
            out.append(Countermeasure("weight-only INT8 (quantization.weights: int8_weight_only)",
                                      f"weights are {w:.0%} of the bytes a step reads: step -{w / 2:.0%} at the "
                                      "roofline", share * hw * w / 2))
            out.append(Countermeasure("weight-only INT4 / W4A16 (quantization.weights: int4_weight_only)",
                                      f"weight bytes /4: step -{3 * w / 4:.0%} at the roofline (accuracy to check)",
                                      share * hw * 3 * w / 4))
        if ref.kv_cache_dtype != "fp8":
            out.append(Countermeasure("FP8 KV cache (quantization.kv_cache: fp8)",
                                      f"KV is {kv:.0%} of the bytes a step reads: step -{kv / 2:.0%}",
                                      share * hw * kv / 2))
        out.append(Countermeasure("more TP (parallel.tp_size x2)",
                                  "bytes per GPU halve: step -~50% minus the all-reduce "
                                  f"({1e3 * ref.decode_comm_s:.3f} ms planned)", share * hw * 0.4))
    out.append(Countermeasure("larger decode batches (more concurrency / build.max_batch_size)",
                              "a step reads the weights once for every sequence in it: tokens/s grows almost "
                              "linearly with batch while HBM-bound (TPOT barely moves)", share * 0.3))
    if resource == "software overhead":
        out.insert(0, Countermeasure("CUDA graphs + fused kernels, or the trtllm-engine target",
                                     f"the step runs at {dec.efficiency:.1%} of the roofline speed: launch and Python "
                                     "overhead dominate, not the GPU" if dec else "overhead dominates", share * 0.9))
    if resource == "interconnect":
        out.insert(0, Countermeasure("keep TP inside a node (NVLink); put PP across nodes with more micro-batches",
                                     "all-reduce over NVLink instead of the network; PP sends once per stage",
                                     share * 0.6))
    return out


def _prefill(resource: str, run: dict[str, Any], sp, pre, ref) -> list[Countermeasure]:
    share = sp.share("prefill")
    out = [Countermeasure("chunked context (serve.enable_chunked_context)",
                          "long prompts are split so decode steps of running requests are not stalled behind "
                          "them (ITL p99 falls; TTFT of the long prompt itself does not)", share * 0.2),
           *_reuse(run, ref, share, "prefill tokens")]
    if resource in ("compute", "software overhead") and (ref is None or ref.weights_quant != "fp8"):
        out.append(Countermeasure("FP8 weights and activations (quantization.weights: fp8, Hopper/Ada)",
                                  "2x dense tensor-core FLOP/s: prefill -~45%", share * 0.45))
    out.append(Countermeasure("more TP (parallel.tp_size x2)",
                              "prefill FLOPs per GPU halve: TTFT -~45% (all-reduce per layer added)", share * 0.45))
    if resource == "software overhead" and pre is not None:
        out.insert(0, Countermeasure("fused attention/GEMM kernels, or the trtllm-engine target",
                                     f"prefill runs at {pre.efficiency:.1%} of the roofline speed", share * 0.9))
    return out


def countermeasures(bottleneck: str, resource: str, run: dict[str, Any], sp, pr, pre, dec,
                    ref) -> list[Countermeasure]:
    """Countermeasures for the verdict, best expected effect first."""
    if bottleneck == "queueing":
        out = _queueing(resource, run, sp, pr, ref)
    elif bottleneck == "decode":
        out = _decode(resource, sp, dec, ref)
    elif bottleneck == "prefill":
        out = _prefill(resource, run, sp, pre, ref)
    elif bottleneck == "client":
        out = [Countermeasure(f"run the load generator in more processes (bench --client-procs "
                              f"{2 * max(1, int(run.get('client_procs', 1)))}) or on another machine",
                              "the client saturates its core, so latencies include client delays", 0.9),
               Countermeasure("benchmark the tensorrt_llm model with token ids",
                              "no text decoding per response on the client", 0.3)]
    elif bottleneck == "tokenizer":
        out = [Countermeasure("raise serve.preprocessing_instances / postprocessing_instances",
                              "tokenization runs in parallel instead of queueing behind one instance", 0.5),
               Countermeasure("send token ids to the tensorrt_llm model (client-side tokenizer)",
                              "removes both Python models from the request path", 0.6)]
    elif bottleneck == "overhead":
        out = [Countermeasure("co-locate the client, use gRPC streaming, check the network path",
                              f"{sp.share('overhead'):.0%} of E2E is spent outside the runtime", sp.share("overhead"))]
    else:
        out = []
    useful = [c for c in out if c.gain >= 0.005] or out
    return sorted(useful, key=lambda c: -c.gain)
