"""The one interface every annotator (simulated or human through Label Studio) implements."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from storage.mask_store import ImageRecord, MaskRecord

__all__ = ["Annotator"]


class Annotator(abc.ABC):
    """Turns a batch of images into masks with provenance, helped by the current model.

    Implementations return :class:`~storage.mask_store.MaskRecord` objects ready for
    ``MaskStore.write_masks`` (stage, round and run id set, deterministic ``mask_id``); they never
    write masks themselves, so the flow commits a round in one atomic write.
    """

    #: Stored in each mask's ``annotator`` column unless a person's own name is known.
    name: str

    @abc.abstractmethod
    def annotate(
        self,
        images: Sequence[ImageRecord],
        model: nn.Module,
        *,
        stage: int,
        round: int,
        run_id: str,
        model_version: str,
        predictions: Mapping[str, Sequence[MaskRecord]] | None = None,
    ) -> list[MaskRecord]:
        """Annotate ``images`` with ``model`` (a ``Sam``) assisting.

        Args:
            images: the round's images (registered in the store).
            model: the model that answers clicks (stage 1) and made ``predictions``.
            stage: 1 (assisted-manual) or 2 (semi-automatic).
            round: the round within the stage (0-based).
            run_id: the engine run the masks belong to (stable across a resumed run).
            model_version: the registry version of ``model``, stored with each mask.
            predictions: stage 2's pre-labels per image id (source ``model``, with scores); kept
                unchanged they come back as ``model`` masks, corrected or new ones as ``manual``.

        Returns:
            The round's masks, every one with ``stage``, ``round`` and ``run_id`` as given.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most annotators hold nothing
        """Release what the annotator holds open (connections); it is not used afterwards."""
