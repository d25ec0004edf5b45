"""`enginesmith client stream|grpc|http`, `enginesmith bench RECIPE|URL`, `enginesmith analyze BENCH.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

# No markup: generated text, server errors and URLs are printed as they are.
console = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_CANCELLED = 1, 2, 130

Opt = typer.Option


def _fail(code: int, msg: str) -> typer.Exit:
    err.print(Text.assemble(("error:", "red"), " ", msg))
    return typer.Exit(code)


def _params(prompt: str, max_tokens, stream, sampling: dict, stop, bad, request_id, include_input):
    from enginesmith.client.params import GenerateParams

    return GenerateParams(text=prompt, max_tokens=max_tokens, stream=stream, stop_words=list(stop or []),
                          bad_words=list(bad or []), request_id=request_id,
                          exclude_input_in_output=None if include_input is None else not include_input,
                          **{k: v for k, v in sampling.items() if v is not None})


def _run_client(protocol: str, url: str, model: str, params, tokenizer, as_json: bool, timeout: float):
    from enginesmith.client.grpc_stream import GrpcStreamClient
    from enginesmith.client.grpc_unary import grpc_generate
    from enginesmith.client.http import HttpClient

    printed = [0]

    def show(_chunk, res) -> None:
        if not as_json:
            text = res.text
            sys.stdout.write(text[printed[0]:])
            sys.stdout.flush()
            printed[0] = len(text)

    if protocol == "grpc":
        res = grpc_generate(url, model, params, tokenizer, timeout)
    elif protocol == "stream":
        with GrpcStreamClient(url, model, tokenizer) as c:
            res = c.generate(params, on_chunk=show, timeout_s=timeout)
    else:
        with HttpClient(url, model, tokenizer, timeout) as c:
            res = c.generate_stream(params, on_chunk=show) if params.stream else c.generate(params)
    if as_json:
        console.print_json(json.dumps(res.to_json()))
        return
    sys.stdout.write(res.text[printed[0]:] + "\n")
    ttft = "-" if res.ttft_s is None else f"{1e3 * res.ttft_s:.1f} ms"
    err.print(f"{res.protocol} {model} request {res.request_id}: {res.num_output_tokens} tokens, "
              f"TTFT {ttft}, E2E {1e3 * res.e2e_s:.1f} ms", style="dim")


def _client_command(protocol: str):
    default_port = {"stream": "8001", "grpc": "8001", "http": "8000"}[protocol]

    def command(
        prompt: Annotated[str, typer.Argument(help="The prompt text.")],
        url: Annotated[Optional[str], Opt(help="Server (default: the recipe's, else 127.0.0.1:8001/8000).")] = None,
        recipe: Annotated[Optional[Path], Opt(metavar="RECIPE", help="URL and tokenizer from this recipe.")] = None,
        out: Annotated[Path, Opt(help="Working directory root of the recipe.")] = Path("out"),
        model: Annotated[str, Opt(help="ensemble | tensorrt_llm_bls | tensorrt_llm (token ids).")] = "ensemble",
        max_tokens: Annotated[int, Opt(help="Tokens to generate.")] = 32,
        stream: Annotated[bool, Opt(help="Stream tokens (ignored by grpc unary).")] = True,
        temperature: Annotated[Optional[float], Opt()] = None,
        top_k: Annotated[Optional[int], Opt()] = None,
        top_p: Annotated[Optional[float], Opt()] = None,
        repetition_penalty: Annotated[Optional[float], Opt()] = None,
        presence_penalty: Annotated[Optional[float], Opt()] = None,
        frequency_penalty: Annotated[Optional[float], Opt()] = None,
        length_penalty: Annotated[Optional[float], Opt()] = None,
        min_tokens: Annotated[Optional[int], Opt()] = None,
        seed: Annotated[Optional[int], Opt()] = None,
        beam_width: Annotated[Optional[int], Opt()] = None,
        end_id: Annotated[Optional[int], Opt()] = None,
        pad_id: Annotated[Optional[int], Opt()] = None,
        stop: Annotated[Optional[list[str]], Opt(help="Stop word (repeatable).")] = None,
        bad: Annotated[Optional[list[str]], Opt(help="Banned word (repeatable).")] = None,
        request_id: Annotated[str, Opt(help="Triton request id (default: random).")] = "",
        include_input: Annotated[Optional[bool], Opt(help="Echo the prompt (default: the model's).")] = None,
        tokenizer: Annotated[Optional[Path], Opt(help="HF tokenizer dir (needed for the tensorrt_llm model).")] = None,
        as_json: Annotated[bool, Opt("--json", help="Print the whole result as JSON.")] = False,
        timeout: Annotated[float, Opt(help="Seconds to wait for the last token.")] = 300.0,
    ) -> None:
        from enginesmith.client.params import ClientError, ServerUnreachable
        from enginesmith.client.target import resolve_target
        from enginesmith.client.tokenizer import load_tokenizer

        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        length_penalty=length_penalty, min_tokens=min_tokens, seed=seed, beam_width=beam_width,
                        end_id=end_id, pad_id=pad_id)
        try:
            tgt = resolve_target(str(recipe), out) if recipe else None
            if url is None:
                url = (tgt.http_url if protocol == "http" else tgt.grpc_url) if tgt else f"127.0.0.1:{default_port}"
            tok_dir = tokenizer or (tgt.tokenizer_dir if tgt and model == "tensorrt_llm" else None)
            tok = load_tokenizer(tok_dir) if tok_dir else None
            params = _params(prompt, max_tokens, stream, sampling, stop, bad, request_id, include_input)
            _run_client(protocol, url, model, params, tok, as_json, timeout)
        except KeyboardInterrupt:
            raise _fail(EXIT_CANCELLED, "cancelled (the request was cancelled on the server)") from None
        except (ClientError, ValueError) as e:
            raise _fail(EXIT_BAD_INPUT, str(e)) from None
        except ServerUnreachable as e:
            raise _fail(EXIT_UNREACHABLE, f"{e} (is it up? `enginesmith serve RECIPE`)") from None
        except Exception as e:  # noqa: BLE001 - connection failures come from grpc/httpx/tritonclient
            raise _fail(EXIT_UNREACHABLE,
                        f"{type(e).__name__}: {e} (is the server up? `enginesmith serve RECIPE`)") from None

    command.__doc__ = {"stream": "Generate over gRPC streaming (decoupled models); Ctrl-C cancels.",
                       "grpc": "Generate with one gRPC ModelInfer call (non-decoupled models).",
                       "http": "Generate over HTTP: /generate, or /generate_stream (SSE) with --stream."}[protocol]
    return command


def register(app: typer.Typer) -> None:
    from enginesmith.client.bench_cli import analyze, bench

    client_app = typer.Typer(help="Send one request to a served model: text in, text out.", no_args_is_help=True)
    for protocol in ("stream", "grpc", "http"):
        client_app.command(protocol)(_client_command(protocol))
    app.add_typer(client_app, name="client")
    app.command("bench")(bench)
    app.command("analyze")(analyze)
