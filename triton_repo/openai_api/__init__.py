"""An OpenAI-compatible HTTP front (`/v1/models`, `/v1/completions`, `/v1/chat/completions`) for the served
Triton deployment: it tokenizes (chat template included), streams token ids from the `tensorrt_llm` model over
gRPC, and detokenizes incrementally (`app.create_app`; `runner` starts it)."""
