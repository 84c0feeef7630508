"""The base of every section of the run config (loraft.config_schema): an unknown key is an error, and an
assignment is validated as a loaded value is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
