"""Resolve what the clients and the bench talk to: a recipe (its ports, tokenizer, SLA, output folder), Triton's
gRPC host:port, or an OpenAI API's http(s):// URL."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from enginesmith.client.params import ClientError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class Target:
    grpc_url: str
    http_url: str
    metrics_url: str | None
    bench_dir: Path
    tokenizer_dir: Path | None = None
    slo_ms: dict[str, float] = field(default_factory=dict)
    isl: int = 128
    osl: int = 64
    concurrency: int | None = None
    request_rate: float | None = None
    max_input_len: int = 1024
    max_seq_len: int = 2048
    recipe_path: Path | None = None
    shared_prefix: int = 0
    """Leading tokens every random prompt shares (the recipe's sla.shared_prefix_tokens)."""
    tokens_per_block: int = 32
    openai_url: str | None = None
    """An OpenAI-compatible API (http://host:port/v1), e.g. enginesmith's front."""


def is_recipe(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and any((d / f).is_file() for f in _TOKENIZER_FILES)


def recipe_tokenizer(recipe, out: Path) -> Path | None:
    """The tokenizer the served model uses: the checkpoint's copy, else the HF snapshot, else a local source."""
    root = out / recipe.name
    for d in (root / "checkpoint" / "tokenizer", root / "hf", Path(recipe.model.source)):
        if _has_tokenizer(d):
            return d
    return None


def _host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind


def from_recipe(path: str | Path, out: Path) -> Target:
    from enginesmith.builders.recipe import load_recipe

    r = load_recipe(path, check_model=False)
    host, s, sla = _host(r.serve.bind_address), r.serve, r.sla
    slo = {k: v for k, v in (("ttft", sla.ttft_ms), ("tpot", sla.tpot_ms), ("e2el", sla.e2e_ms)) if v}
    return Target(grpc_url=f"{host}:{s.grpc_port}", http_url=f"http://{host}:{s.http_port}",
                  metrics_url=f"http://{host}:{s.metrics_port}/metrics", bench_dir=out / r.name / "bench",
                  tokenizer_dir=recipe_tokenizer(r, out), slo_ms=slo, isl=sla.isl, osl=sla.osl,
                  concurrency=sla.concurrency, request_rate=sla.request_rate,
                  max_input_len=r.build.max_input_len, max_seq_len=r.build.max_seq_len, recipe_path=Path(path),
                  shared_prefix=sla.shared_prefix_tokens, tokens_per_block=r.build.tokens_per_block)


def openai_base(url: str) -> str:
    """http://host:port[/v1] -> http://host:port/v1."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    return base if base.endswith("/v1") else base + "/v1"


def from_url(url: str, out: Path) -> Target:
    """`host:port` or `grpc://host:port` (the gRPC endpoint; HTTP is assumed one port below, as Triton's
    defaults), or `http(s)://host:port[/v1]` (an OpenAI API)."""
    if url.startswith(("http://", "https://")):
        return Target(grpc_url="", http_url="", metrics_url=None, bench_dir=out / "bench", openai_url=openai_base(url))
    hostport = url.split("://", 1)[-1].rstrip("/")
    if ":" not in hostport:
        raise ClientError(f"target {url!r}: expected a recipe file or host:port of Triton's gRPC endpoint")
    host, port = hostport.rsplit(":", 1)
    if not port.isdigit():
        raise ClientError(f"target {url!r}: port {port!r} is not a number")
    return Target(grpc_url=f"{host}:{port}", http_url=f"http://{host}:{int(port) - 1}", metrics_url=None,
                  bench_dir=out / "bench")


def resolve_target(target: str, out: str | Path = "out") -> Target:
    return from_recipe(target, Path(out)) if is_recipe(target) else from_url(target, Path(out))
