"""Pushing a build to the Hub: the same files as the local folder (`folder.py`), in two commits.

`DatasetDict.push_to_hub` writes the data and the README's `configs` / `dataset_info` blocks, then the card body,
plot, config and summary are merged in one more commit (a card pushed over the first README would wipe those
blocks).
"""

import logging
import time
from pathlib import Path

from datasets import DatasetDict

from .card import render_card
from .folder import README, card_files, write_files


logger = logging.getLogger("magpie_builder")

RETRIES = 3


class PushError(RuntimeError):
    """A push that could not be done; the message says why and what to do."""


def _is_transient(error: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code >= 500
    # huggingface_hub's HTTP client raises its own TransportError family for refused or dropped connections.
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ == "TransportError" for cls in type(error).__mro__
    )


def with_retries(step: str, function, *args, **kwargs):
    """Runs one push step, again after a server error or a dropped connection (3 tries, backoff 1 s, 2 s).

    Every step is safe to repeat: creating the repo accepts an existing one, and a commit lands whole or not at
    all, so a failed try leaves the repo as it was.
    """
    from huggingface_hub import constants

    for attempt in range(1, RETRIES + 1):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if not _is_transient(error):
                raise
            if attempt == RETRIES:
                raise PushError(
                    f"{step} failed {RETRIES} times against {constants.ENDPOINT} ({_describe(error)}). The repo was "
                    "left as it was before this step; check that the Hub is reachable (HF_ENDPOINT) and push again."
                ) from error
            logger.warning("%s failed (%s); trying again", step, _describe(error))
            time.sleep(2 ** (attempt - 1))


def _describe(error: Exception) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return f"HTTP {status}" if status else type(error).__name__


def hub_token() -> str:
    """The token from HF_TOKEN or the user's saved login; never from a config file."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PushError("No Hugging Face token found: set HF_TOKEN, or run `hf auth login`, then push again.")
    return token


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"`repo_id` {repo_id!r} is not a valid Hub repo id ({error}). Use user/name.") from error
    if repo_id.count("/") != 1:
        raise PushError(f"`repo_id` {repo_id!r} needs a namespace: use user/name or org/name.")


def check_rights(api, repo_id: str, token: str) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        me = with_retries("Checking the token", api.whoami, token=token)
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise PushError(
                "The Hub rejected the token (401): log in again with `hf auth login` or set a valid "
                "HF_TOKEN with write access."
            ) from error
        raise
    namespace = repo_id.split("/")[0]
    mine = {me["name"], *(org["name"] for org in me.get("orgs", []))}
    if namespace not in mine:
        raise PushError(
            f"{repo_id} belongs to {namespace!r}, and this token can write only to "
            f"{', '.join(sorted(mine))}. Push to a repo of your own namespace."
        )


def check_can_push(
    repo_id: str, columns: list[str] | None = None, revision: str | None = None, force: bool = False
) -> None:
    """What a push needs, checked before anything is built: a valid repo id, a token, the Hub reachable, the token's
    right to write to that namespace, and (unless `force`) a repo that holds no dataset with other columns than
    `columns`, the ones this build will publish. Raises `ValueError` (a setting or a login to fix); the push checks
    all of it again, and the full schema, when it runs."""
    from huggingface_hub import HfApi

    try:
        check_repo_id(repo_id)
        token = hub_token()
        api = HfApi(token=token)
        check_rights(api, repo_id, token)
        if columns is not None and not force:
            check_columns(existing_card(api, repo_id, revision, token), columns, repo_id)
    except PushError as error:
        raise ValueError(f"Cannot push to the Hub: {error}") from error


def check_columns(card, columns: list[str], repo_id: str) -> None:
    existing = (card.data.to_dict().get("dataset_info") or {}) if card else {}
    if isinstance(existing, list):
        existing = next((info for info in existing if info.get("config_name", "default") == "default"), {})
    names = sorted(feature["name"] for feature in existing.get("features") or [])
    if names and names != sorted(columns):
        raise PushError(
            f"{repo_id} already holds a dataset with other columns ({names}; this build writes {sorted(columns)}). "
            "Push to a new repo, or set `force_push: true` to replace it."
        )


def existing_card(api, repo_id: str, revision: str | None, token: str):
    """The README of the repo, or None when the repo (or its README) does not exist yet.

    Read at the commit the branch points to now, never from a cached "main": the cache may hold the README of a
    repo that has since been deleted or rewritten.
    """
    from huggingface_hub import DatasetCard, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = with_retries(
            "Reading the repo", api.repo_info, repo_id, repo_type="dataset", revision=revision, token=token
        )
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None
    if README not in {sibling.rfilename for sibling in info.siblings or []}:
        return None
    path = with_retries(
        "Reading the repo's card",
        hf_hub_download,
        repo_id,
        README,
        repo_type="dataset",
        revision=info.sha,
        token=token,
    )
    return DatasetCard(Path(path).read_text())


def check_schema(card, dataset: DatasetDict, repo_id: str) -> None:
    """Refuses to push over a dataset whose columns differ; `force_push` overrides."""
    from datasets.info import DatasetInfo

    existing = (card.data.to_dict().get("dataset_info") or {}) if card else {}
    if isinstance(existing, list):
        existing = next((info for info in existing if info.get("config_name", "default") == "default"), {})
    if not existing.get("features"):
        return
    ours = DatasetInfo(features=next(iter(dataset.values())).features)._to_yaml_dict()["features"]
    if existing["features"] != ours:
        old = sorted(f["name"] for f in existing["features"])
        new = sorted(f["name"] for f in ours)
        raise PushError(
            f"{repo_id} already holds a dataset with another schema (columns {old}, pushing {new}). "
            "Push to a new repo, or set `force_push: true` to replace it."
        )


def push_to_hub(
    result,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    force: bool = False,
    folder: str | Path | None = None,
) -> str:
    """Pushes the dataset, then its card, plot, build config and summary in one commit. Returns the URL."""
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi, constants

    check_repo_id(repo_id)
    token = hub_token()
    api = HfApi(token=token)
    check_rights(api, repo_id, token)
    if not force:
        check_schema(existing_card(api, repo_id, revision, token), result.dataset, repo_id)

    commit = with_retries(
        "Uploading the data",
        result.dataset.push_to_hub,
        repo_id,
        private=private,
        revision=revision,
        token=token,
        commit_message="Upload preference data (magpie-builder)",
    )
    pushed = existing_card(api, repo_id, revision or commit.oid, token)
    metadata = pushed.data.to_dict() if pushed else {}
    card = render_card(result, repo_id=repo_id, metadata=metadata)
    DatasetCard(str(card))  # parses back, or fails here rather than on the Hub
    files = card_files(result, card)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in files.items()]
    try:
        with_retries(
            "Uploading the card",
            api.create_commit,
            repo_id,
            operations=operations,
            repo_type="dataset",
            revision=revision,
            commit_message="Dataset card, reward plot and build config (magpie-builder)",
            parent_commit=commit.oid,
        )
    except PushError as error:
        raise PushError(
            f"The data landed in {repo_id} (commit {commit.oid}) but its card did not: {error} Push "
            "again to add the card; re-pushing the same dataset is safe."
        ) from error
    if folder is not None:
        write_files(Path(folder), files)  # the local folder gets the very card the Hub has
    url = f"{constants.ENDPOINT}/datasets/{repo_id}" + (f"/tree/{revision}" if revision else "")
    logger.info("pushed %s", url)
    return url
