"""What the Hugging Face Hub's refusals mean for a recipe's `model.source`, as one line each.

Used wherever enginesmith asks the Hub (the download's listing and files, a spec's config.json), so a gated
repository, a repo id that is not there (perhaps a local folder that is not there either), a missing revision
and an unreachable Hub read the same from `plan` and `convert`. Works with the errors of every supported
huggingface_hub (0.24 and later): its error classes by name, its HTTP library's (requests, httpx) as the rest.
"""

from __future__ import annotations

from enginesmith.builders.model_source import SourceRef


def first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def gated_message(repo_id: str) -> str:
    from huggingface_hub import get_token

    token = "HF_TOKEN is not set" if get_token() is None else "the token in use has no access to it yet"
    return (f"{repo_id} is a gated repository ({token}): request access on https://huggingface.co/{repo_id} "
            "(accept its terms while logged in), then set HF_TOKEN to a token of that account")


def hub_error_message(ref: SourceRef, revision: str, e: BaseException, action: str, other_fix: str = "") -> str:
    """One line for a Hub call about `ref` that raised `e`; `action` says what was asked ('list', 'fetch
    config.json of'); `other_fix` is appended to the fixes of a Hub that could not be reached."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):  # a RepositoryNotFoundError too: test it first
        return gated_message(ref.text)
    if isinstance(e, RevisionNotFoundError):
        return f"model.revision={revision!r}: {ref.text} has no such branch, tag or commit on the Hub"
    if isinstance(e, RepositoryNotFoundError):
        return (f"model.source={ref.text!r}: no Hub repo {ref.text} (a private one needs HF_TOKEN), and "
                f"{ref.not_local_either()}; fix the repo id or the path")
    return (f"model.source={ref.text!r}: cannot {action} {ref.text}@{revision} on the Hub ({type(e).__name__}: "
            f"{first_line(e)}), and {ref.not_local_either()}; check the network and HF_TOKEN, set HF_HUB_OFFLINE=1 "
            f"to use the cache, {other_fix + ', ' if other_fix else ''}or fix the path")
