"""Reading a Hub repo's small files with the ``huggingface_hub`` client: what the client raises
turned into one sentence each, and safetensors headers read by range requests. Shared by
:mod:`merge_engine.sources.inspection` (models) and
:mod:`merge_engine.sources.formats.peft_adapter` (adapters)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from merge_engine.errors import SourceError, UnsafeCheckpointError
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.hub_failures import read_failed
from merge_engine.sources.tensors import TensorInfo, tensor_infos


@contextmanager
def hub_errors(ref: ModelReference) -> Iterator[None]:
    """Turn what the Hub client raises while reading ``ref`` into one sentence each."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        NotASafetensorsRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except (SourceError, UnsafeCheckpointError):
        raise
    except GatedRepoError:
        raise SourceError(
            f"{ref.path} is gated; accept its terms on the Hub and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"model repo {ref.path} does not exist on the Hub or is private; check the name, or log in with a token that can read it"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(
            f"{ref.path} has no revision {ref.revision!r}; use a branch, tag or commit that exists"
        ) from None
    except NotASafetensorsRepoError:
        raise UnsafeCheckpointError(
            f"{ref.path} has no safetensors weights; mergebot reads safetensors only (pickle weights can run code)"
        ) from None
    except EntryNotFoundError:
        raise SourceError(
            f"a file that {ref.path} lists is missing on the Hub; check the repo, or pin a revision that is complete"
        ) from None
    except OfflineModeIsEnabled:
        raise SourceError(
            f"{ref.path} is a Hub model but HF_HUB_OFFLINE is set; unset it, or point the recipe at a local folder"
        ) from None
    except Exception as error:  # noqa: BLE001  (HTTP, transport and reading errors alike)
        raise SourceError(read_failed(error, str(ref))) from None


def hub_infos(found: Any, ref: ModelReference, sha: str, file: str) -> dict[str, TensorInfo]:
    """The tensors of one Hub file from the client's parsed header (``found``)."""
    header = {name: {"dtype": i.dtype, "shape": i.shape} for name, i in found.tensors.items()}
    return tensor_infos(header, file, f"{ref.path}@{sha}/{file}")


def hub_header(api: Any, ref: ModelReference, sha: str, file: str) -> dict[str, TensorInfo]:
    """One Hub file's tensors, from its header alone (a range request)."""
    return hub_infos(
        api.parse_safetensors_file_metadata(ref.path, file, revision=sha), ref, sha, file
    )
