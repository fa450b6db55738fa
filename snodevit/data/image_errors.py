"""The one vocabulary of refused images: an :class:`ImageError` carries a code from :data:`IMAGE_ERROR_CODES`.

The decoder (:mod:`snodevit.data.decode`) and the mode conversion (:mod:`snodevit.data.modes`) raise it; the
service maps each code to an HTTP status (``service.errors``) and `snodevit score` writes the code in its error
rows, so the same bad file gets the same code from both.
"""

from __future__ import annotations

from typing import Literal, get_args


#: The one vocabulary of refused images, shared by the service (which maps each code to an HTTP status in
#: ``service.errors``) and `snodevit score` (whose error rows carry the code).
ImageErrorCode = Literal["empty_body", "too_large", "too_many_pixels", "not_an_image", "unsupported_format",
                         "truncated_image", "corrupt_image", "unreadable_file"]
IMAGE_ERROR_CODES: tuple[str, ...] = get_args(ImageErrorCode)


class ImageError(ValueError):
    """An image was refused.

    Attributes:
        error: short machine-readable code, one of ``IMAGE_ERROR_CODES``.
        detail: a human-readable sentence naming the problem.
    """

    def __init__(self, error: ImageErrorCode, detail: str) -> None:
        if error not in IMAGE_ERROR_CODES:
            raise ValueError(f"ImageError code must be one of {list(IMAGE_ERROR_CODES)}, got {error!r}")
        super().__init__(detail)
        self.error = error
        self.detail = detail

    def to_dict(self) -> dict[str, str]:
        """JSON body for an error response: ``{"error": ..., "detail": ...}``."""
        return {"error": self.error, "detail": self.detail}

    def __repr__(self) -> str:
        return f"ImageError(error={self.error!r}, detail={self.detail!r})"


def undecodable(err: BaseException, where: str | None = None) -> ImageError:
    """The refusal of a file that broke the decoder in a way its own checks did not foresee: still the sender's
    file (``corrupt_image``), never a crash. The service and `snodevit score` both call this."""
    prefix = f"{where}: " if where else ""
    return ImageError("corrupt_image", f"{prefix}the image could not be decoded ({type(err).__name__}: {err})")
