"""Reading samples from the tar shards: segments read through (any URL webdataset opens), or one sample
by its row of the sample index, with one positioned read (shards that are files). Only the .jpg and .cls
members of a sample are ever kept: a shard carrying a pickle never reaches pickle.loads."""

from __future__ import annotations

import collections
import io
import os
import resource
import tarfile
from typing import Iterator

import webdataset as wds

from pipeline.data.order import Segment

SAMPLE_EXTENSIONS = (".jpg", ".cls")


def read_segments(segments: list[Segment]) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "jpg", "cls"} of each segment in turn (a skip reads through the tar)."""
    for seg in segments:
        streams = wds.tariterators.url_opener([{"url": seg.url}])
        files = wds.tariterators.tar_file_expander(streams, select_files=lambda name: name.endswith(SAMPLE_EXTENSIONS))
        samples = wds.tariterators.group_by_keys(files)
        taken = 0
        for i, sample in enumerate(samples):
            if i < seg.skip:
                continue
            if "jpg" not in sample or "cls" not in sample:
                raise ValueError(f"{seg.url}: sample {sample['__key__']!r} lacks .jpg or .cls")
            yield sample
            taken += 1
            if taken == seg.take:
                break
        if taken != seg.take:
            raise ValueError(f"{seg.url}: expected {seg.skip + seg.take} samples, found {seg.skip + taken}; "
                             "the shard does not match its manifest, reconvert it")


class SampleReader:
    """Samples by their rows of the sample index (pipeline.data.manifest): one os.pread of the sample's
    bytes (its tar headers and data), from shard files kept open.

    Each process keeps up to all the shards open (raising its soft limit on open files to the hard one when
    needed), so a shard is opened once per worker and run, not once per sample: on Lustre or NFS an open is
    a metadata request, a positioned read is not.
    """

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.files: collections.OrderedDict[int, int] = collections.OrderedDict()  # shard -> fd, oldest first
        self.max_open = 0

    def _fd(self, shard: int) -> int:
        fd = self.files.get(shard)
        if fd is not None:
            self.files.move_to_end(shard)
            return fd
        if not self.max_open:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = len(self.urls) + 64
            if soft != resource.RLIM_INFINITY and soft < want:
                soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            self.max_open = max(8, min(len(self.urls), soft - 64))
        if len(self.files) >= self.max_open:
            os.close(self.files.popitem(last=False)[1])
        fd = self.files[shard] = os.open(self.urls[shard], os.O_RDONLY)
        return fd

    def read(self, shard: int, offset: int, length: int) -> dict:
        """The sample {"__key__", "__url__", "jpg", "cls"} whose members fill [offset, offset + length) of a
        shard."""
        url = self.urls[shard]
        data = os.pread(self._fd(shard), length, offset)
        sample = {"__url__": url}
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    key, ext = wds.tariterators.base_plus_ext(member.name)
                    if member.isreg() and "." + str(ext) in SAMPLE_EXTENSIONS:
                        sample["__key__"] = key
                        sample[ext] = tar.extractfile(member).read()
        except tarfile.TarError as err:
            raise ValueError(f"{url}: bytes {offset}..{offset + length} are not a sample ({err}); the shard does not "
                             "match its index: check it with python -m pipeline.shards verify") from None
        if "jpg" not in sample or "cls" not in sample:
            raise ValueError(f"{url}: bytes {offset}..{offset + length} hold no .jpg and .cls sample; the shard does "
                             "not match its index: check it with python -m pipeline.shards verify")
        return sample

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
