"""A Hub model's safetensors shards, fetched one by one as the layers need them.

Opening a Hub model downloads only its metadata (config, index, tokenizer). Each shard is fetched by
huggingface_hub (artifact.hub.download_file) the first time a tensor in it is read, into the usual cache, so a shard
is never downloaded twice: a second run, or `--resume` after a kill, finds the finished shards in the cache (a shard
whose download was cut off is fetched again whole: huggingface_hub 2.x keeps no partial file across processes).

With `model.keep_download: false` each shard this run downloaded is deleted (link and blob) once every layer it holds
is done, so the disk holds about two shards at a time instead of the whole model. A shard that was already in the
cache before the run is never deleted: it is the user's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from teal_quant.architecture import LAYERS_PREFIX

START, END = -1, 1 << 30  # when the embedding (read first) and the final norm / lm_head (read last) are used


def tensor_use(name: str) -> int:
    """The step at which the pipeline reads a tensor: its decoder layer, START for the embedding, END for the rest."""
    prefix = LAYERS_PREFIX + "."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".", 1)[0])
    return START if name.endswith("embed_tokens.weight") else END


@dataclass
class HubShards:
    """The shards of one Hub snapshot: fetched on first use, released (when `keep` is off) after their last use."""

    repo_id: str
    revision: str  # the snapshot's commit: every shard comes from the same one
    folder: Path  # the snapshot folder in the huggingface_hub cache
    last_use: dict[str, int]  # shard file name -> the last step that reads it
    keep: bool = True
    downloaded: list[str] = field(default_factory=list)  # fetched by this run (the only ones it may delete)
    deleted: list[str] = field(default_factory=list)

    @classmethod
    def from_weight_map(cls, repo_id: str, revision: str, folder: Path, weight_map: dict[str, str],
                        keep: bool) -> "HubShards":
        last: dict[str, int] = {}
        for name, file in weight_map.items():
            last[file] = max(last.get(file, START), tensor_use(name))
        return cls(repo_id=repo_id, revision=revision, folder=folder, last_use=last, keep=keep)

    def missing(self) -> list[str]:
        """The shards not in the cache yet (what this run will download)."""
        return [f for f in self.last_use if not (self.folder / f).exists()]

    def ensure(self, path: Path) -> None:
        """Download shard `path` (a file of the snapshot folder) unless the cache has it."""
        if path.exists():
            return
        from teal_quant.artifact.hub import download_file

        got = download_file(self.repo_id, path.name, revision=self.revision, cache_dir=self.folder.parents[2])
        if got.resolve() != path.resolve():  # the cache put it elsewhere: link it where the index says it is
            path.symlink_to(got)
        self.downloaded.append(path.name)

    def adopt(self, files: list[str]) -> None:
        """Shards an interrupted run of this same output downloaded (--resume): this run may delete them too."""
        for f in files:
            if f in self.last_use and f not in self.downloaded and (self.folder / f).exists():
                self.downloaded.append(f)

    def release(self, step: int) -> None:
        """Every layer up to `step` is done: delete the shards this run downloaded that nothing later reads."""
        if self.keep:
            return
        for file in list(self.downloaded):
            if self.last_use.get(file, END) <= step:
                self._delete(file)

    def release_all(self) -> None:
        self.release(END)

    def _delete(self, file: str) -> None:
        link = self.folder / file
        blob = link.resolve()
        link.unlink(missing_ok=True)
        if blob != link:
            blob.unlink(missing_ok=True)
        self.downloaded.remove(file)
        self.deleted.append(file)
