"""Registry errors.

    RegistryError
     ├── VersionNotFound       the model, version or alias does not exist
     ├── RegistryUnavailable   the registry could not be reached (network, server down)
     └── ArtifactRejected      the artifact exists but must not be served (sha256 mismatch, missing file)
"""

from __future__ import annotations


class RegistryError(Exception):
    pass


class VersionNotFound(RegistryError):
    pass


class RegistryUnavailable(RegistryError):
    pass


class ArtifactRejected(RegistryError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
