"""``vitforge export RUN_ROOT STAGE DEST --push-to-hub REPO``: a finished export to the Hugging Face Hub.

The export folder (``model.safetensors``, ``config.json`` in timm's hub layout, the ``README.md``
model card) is uploaded as it is through ``huggingface_hub`` (one commit; the repository is created
when missing), so ``timm.create_model("hf-hub:REPO", pretrained=True)`` loads it. The token comes
from huggingface_hub's usual places (``HF_TOKEN``, ``huggingface-cli login``), the endpoint from
``HF_ENDPOINT`` (a private Hub mirror; the default is huggingface.co), never from the spec.
"""

from __future__ import annotations

from typing import Any


class HubError(RuntimeError):
    """The Hub refused the upload or could not be reached; the message says which and what to do."""


def push_folder(folder: str, repo_id: str, *, private: bool = False, endpoint: str | None = None,
                token: str | None = None, message: str | None = None) -> str:
    """Upload every file of ``folder`` to model repository ``repo_id`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=message or "vitforge export")
    except OfflineModeIsEnabled as exc:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set ({exc}); unset it to upload") from None
    except HfHubHTTPError as exc:
        raise HubError(f"the Hub ({api.endpoint}) refused the push to {repo_id}: {exc}. Check the token "
                       "(HF_TOKEN or `huggingface-cli login`) and that it may write to that repository") from None
    except OSError as exc:  # connection errors (requests/httpx wrap them as OSError subclasses)
        raise HubError(f"cannot reach the Hub at {api.endpoint} to push {repo_id}: {exc}") from None
    return str(getattr(info, "commit_url", info))
