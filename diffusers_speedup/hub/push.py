"""Pushing exported folders and cached-latent datasets to the Hub, in the foreground or in a background thread.

The token is never handled here beyond passing `token` through: None lets huggingface_hub find it in the usual
places (the HF_TOKEN environment variable, then the login cache written by `hf auth login`). Error messages are
scrubbed of token-like strings before they are logged or returned.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import threading
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path

from ..utils import is_saved_dataset

logger = logging.getLogger(__name__)

_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9_\-]{6,}")
# An Authorization header echoed back in a server's error text, whatever the token looks like.
_BEARER_PATTERN = re.compile(r"(?i)(bearer\s+)[^\s'\",}]+")


class PushError(RuntimeError):
    """A push to the Hub failed; the message is one line, already scrubbed of the token."""


def _redact(text: str, token: str | None = None) -> str:
    """`text` with the token (and anything shaped like a Hub token) replaced by ***."""
    if token:
        text = text.replace(token, "***")
    try:
        from huggingface_hub import get_token

        found = get_token()
        if found:
            text = text.replace(found, "***")
    except Exception:  # noqa: BLE001 - redaction must never raise
        pass
    return _BEARER_PATTERN.sub(r"\1***", _TOKEN_PATTERN.sub("hf_***", text))


def _push_error(what: str, repo_id: str, error: BaseException, token: str | None) -> PushError:
    """One line saying what failed and why (the underlying error's text, whitespace collapsed), token removed."""
    # The server's reason often follows on later lines ("Bad request for commit endpoint:\n<reason>").
    reason = " ".join(str(error).split())
    if len(reason) > 500:
        reason = reason[:500] + " ..."
    return PushError(_redact(f"pushing {what} to {repo_id} failed: {type(error).__name__}: {reason}", token))


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload pipeline",
    path_in_repo: str | None = None,
    ignore_patterns: list[str] | None = None,
    repo_type: str = "model",
) -> str:
    """Creates `repo_id` if needed and uploads `folder` to it in one commit (more than one for very large folders
    when hf_xet is installed). Returns the commit URL.

    Args:
        folder: local folder to upload (e.g. from `export_pipeline`).
        repo_id: "user/name" or "org/name".
        private: create the repository as private (has no effect on an existing repository).
        token: Hub token; None uses HF_TOKEN or the cached login.
        commit_message: message of the commit.
        path_in_repo: upload into this subfolder of the repository instead of its root.
        ignore_patterns: glob patterns of files not to upload (in addition to `.git/` and hidden temp folders).
        repo_type: "model" or "dataset".

    Raises:
        PushError: one token-free line when the Hub refuses or cannot be reached.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder to push does not exist or is not a folder: {folder}")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns or []) + [".*.tmp-*", ".*.old-*"],
            repo_type=repo_type,
        )
    except Exception as error:
        # `from None`: the chained traceback would carry the server's text, which may echo the token.
        raise _push_error(str(folder), repo_id, error, token) from None
    logger.info("Pushed %s to %s (%s)", folder, repo_id, commit_message)
    return str(info)


_DATASET_STORAGE_FILES = ("*.arrow", "state.json", "dataset_info.json", "dataset_dict.json")


def push_dataset_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload cached latents",
    max_shard_size: str | int = "500MB",
) -> str:
    """Pushes a cached-latent dataset folder to a dataset repository.

    A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` is pushed with datasets'
    `load_from_disk(folder).push_to_hub(...)`: the Arrow files become parquet shards under data/ plus a README
    with the features, so `datasets.load_dataset(repo_id)` and the dataset viewer work, and the Array3D shapes
    survive in the features metadata. Any other top-level files of the folder (e.g. the cache's metadata: VAE id,
    scaling factor, resolution) are uploaded unchanged in a second commit. A folder that is not a saved dataset
    is uploaded as it is with `upload_folder`.

    Args:
        folder: the dataset folder.
        repo_id: "user/name" of the dataset repository (created if missing).
        private: create it private.
        token: Hub token; None uses HF_TOKEN or the cached login.
        commit_message: message of the (first) commit.
        max_shard_size: largest parquet shard.

    Returns the URL of the last commit.

    Raises:
        PushError: one token-free line when the Hub refuses or cannot be reached.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder does not exist or is not a folder: {folder}")
    if not is_saved_dataset(folder):
        return push_folder_to_hub(
            folder, repo_id, private=private, token=token, commit_message=commit_message, repo_type="dataset"
        )

    from datasets import load_from_disk
    from huggingface_hub import HfApi

    dataset = load_from_disk(str(folder))
    try:
        info = dataset.push_to_hub(
            repo_id, private=private, token=token, commit_message=commit_message, max_shard_size=max_shard_size
        )
        url = str(info)
        extras = [p for p in folder.iterdir() if p.is_file() and not any(p.match(g) for g in _DATASET_STORAGE_FILES)]
        if extras:
            info = HfApi(token=token).upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=folder,
                allow_patterns=[p.name for p in extras],
                commit_message="Upload latent-cache metadata",
            )
            url = str(info)
    except Exception as error:
        raise _push_error(f"dataset {folder}", repo_id, error, token) from None
    logger.info("Pushed dataset %s to %s", folder, repo_id)
    return url


@dataclasses.dataclass
class PushResult:
    """Outcome of one background push. `error` is the last error (token-free text) when `ok` is False."""

    folder: str
    commit_message: str
    ok: bool
    attempts: int
    commit_url: str | None = None
    error: str | None = None
    superseded: bool = False


def _snapshot(folder: Path) -> Path:
    """Hard-linked copy of `folder`, so the trainer may replace or delete it while the upload reads the copy.
    Falls back to real copies where hard links are impossible (another file system)."""
    root = Path(tempfile.mkdtemp(prefix="hub-push-"))
    copy = root / folder.name

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(folder, copy, copy_function=link_or_copy)
    return copy


def _remove_snapshot(snapshot_dir: Path | None) -> None:
    if snapshot_dir is not None:
        shutil.rmtree(snapshot_dir.parent, ignore_errors=True)


@dataclasses.dataclass
class _Upload:
    """One submitted folder: what to upload, and how to stop its retries (a newer folder came, or `close`)."""

    folder: Path
    commit_message: str
    snapshot: Path | None
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    future: Future | None = None


class BackgroundHubPusher:
    """Pushes folders to one Hub repository in the background, so training never waits on the network and never
    dies because of it.

    `submit(folder)` returns at once. A push that is still queued when a newer one is submitted is dropped (the
    newer folder supersedes it); the one already uploading finishes. A failed push is retried with exponential
    backoff; if a newer folder arrives meanwhile the retries stop in its favour. Errors are logged (without the
    token) and never raised into the training loop; `wait()` / `close()` return the result of the last push so
    the caller can report it at the end of training.

    The uploads run on huggingface_hub's own background worker (`HfApi.run_as_future`: one thread, jobs in the
    order submitted). `upload_folder(..., run_as_future=True)` alone would not do: it makes a single attempt, and
    it reads the folder when its turn comes, after the trainer may have replaced it. So each job is a snapshot
    taken at `submit` plus the retry loop around `push_folder_to_hub`; latest-wins is `Future.cancel` on a job
    still queued, and an event that ends the retry wait of the one already running.

    Args:
        repo_id: "user/name" of the model repository.
        enabled: False makes every method a no-op (pass `accelerator.is_main_process and push_to_hub`).
        private: create the repository as private.
        token: Hub token; None uses HF_TOKEN or the cached login.
        max_retries: retries after the first failed attempt of one push.
        retry_delay: seconds before the first retry; doubled after each further failure, capped at `max_retry_delay`.
        max_retry_delay: longest wait between retries.
        snapshot: upload a hard-linked snapshot of the folder taken at `submit`, so the caller may replace
            (write a new folder and rename it into place, as `export_pipeline` does) or delete the folder right
            away. Files rewritten in place share their data with the snapshot, so don't do that before the push
            finished (`wait()`); pass False to upload the folder itself.
        ignore_patterns: glob patterns not to upload (e.g. optimizer states).
    """

    def __init__(
        self,
        repo_id: str,
        *,
        enabled: bool = True,
        private: bool = False,
        token: str | None = None,
        max_retries: int = 5,
        retry_delay: float = 10.0,
        max_retry_delay: float = 600.0,
        snapshot: bool = True,
        ignore_patterns: list[str] | None = None,
    ):
        if max_retries < 0 or retry_delay < 0 or max_retry_delay < 0:
            raise ValueError(
                f"max_retries, retry_delay and max_retry_delay must be >= 0, got {max_retries}, {retry_delay}, "
                f"{max_retry_delay}"
            )
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.enabled = enabled
        self.private = private
        self._token = token
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.snapshot = snapshot
        self.ignore_patterns = ignore_patterns
        self.results: list[PushResult] = []
        self._api = HfApi(token=token)
        self._latest: _Upload | None = None
        self._closed = False

    def submit(self, folder: str | os.PathLike, commit_message: str | None = None) -> None:
        """Queues `folder` for upload and returns immediately (replacing a queued, not yet started push)."""
        if not self.enabled:
            return
        folder = Path(folder)
        commit_message = commit_message or f"Upload {folder.name}"
        if self._closed:
            raise RuntimeError("BackgroundHubPusher.submit called after close()")
        try:
            snapshot = _snapshot(folder) if self.snapshot else None
        except OSError as error:  # the folder vanished or the disk is full: report, don't raise into training
            self._record(PushResult(str(folder), commit_message, False, 0, error=_redact(repr(error), self._token)))
            return
        previous, upload = self._latest, _Upload(folder, commit_message, snapshot)
        self._latest = upload
        if previous is not None:
            previous.stop.set()
            if previous.future.cancel():  # still queued: it never runs
                self._record(PushResult(str(previous.folder), previous.commit_message, False, 0, superseded=True))
                _remove_snapshot(previous.snapshot)
        upload.future = self._api.run_as_future(self._push_with_retries, upload)

    def wait(self, timeout: float | None = None) -> PushResult | None:
        """Blocks until nothing is queued or uploading (or `timeout` seconds pass); returns the last result."""
        if not self.enabled:
            return None
        if self._latest is not None:
            # Jobs run one at a time in submission order, so the newest one finishing means all have.
            futures.wait([self._latest.future], timeout)
        return self.last_result

    def close(self, timeout: float | None = None) -> PushResult | None:
        """Waits for the queued push to finish (see `wait`) and returns the final result. A push still retrying
        after `timeout` stops at its next wait, so it does not hold up the end of the process."""
        if not self.enabled:
            return None
        result = self.wait(timeout)
        self._closed = True
        if self._latest is not None:
            self._latest.stop.set()
        return result

    @property
    def last_result(self) -> PushResult | None:
        """Result of the newest push that ran (superseded ones skipped), or None before any has finished."""
        for result in reversed(self.results):
            if not result.superseded:
                return result
        return None

    def _record(self, result: PushResult) -> None:
        self.results.append(result)
        if result.ok:
            logger.info("Pushed %s to %s after %d attempt(s)", result.folder, self.repo_id, result.attempts)
        elif result.superseded:
            logger.info("Push of %s superseded by a newer folder", result.folder)
        else:
            logger.error("Giving up pushing %s to %s: %s", result.folder, self.repo_id, result.error)

    def _push_with_retries(self, upload: _Upload) -> None:
        """Runs on the background worker; records the outcome and never raises."""
        folder, message = upload.folder, upload.commit_message
        upload_dir = upload.snapshot or folder
        delay, attempts = self.retry_delay, 0
        try:
            while True:
                attempts += 1
                try:
                    url = push_folder_to_hub(
                        upload_dir,
                        self.repo_id,
                        private=self.private,
                        token=self._token,
                        commit_message=message,
                        ignore_patterns=self.ignore_patterns,
                    )
                    self._record(PushResult(str(folder), message, True, attempts, commit_url=url))
                    return
                except Exception as error:  # noqa: BLE001 - any failure is reported, never raised into training
                    if isinstance(error, PushError):  # already one redacted line; name the folder, not its snapshot
                        error_text = str(error).replace(str(upload_dir), str(folder))
                    else:
                        error_text = _redact(f"{type(error).__name__}: {error}", self._token)
                if attempts > self.max_retries:
                    self._record(PushResult(str(folder), message, False, attempts, error=error_text))
                    return
                logger.warning(
                    "Push of %s to %s failed (attempt %d of %d), retrying in %.1fs: %s",
                    folder,
                    self.repo_id,
                    attempts,
                    self.max_retries + 1,
                    delay,
                    error_text,
                )
                if upload.stop.wait(delay):  # a newer folder arrived, or the pusher was closed
                    superseded = self._latest is not upload
                    self._record(
                        PushResult(str(folder), message, False, attempts, error=error_text, superseded=superseded)
                    )
                    return
                delay = min(delay * 2, self.max_retry_delay)
        finally:
            _remove_snapshot(upload.snapshot)
