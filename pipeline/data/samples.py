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

import numpy as np
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

    def read(self, row: np.void) -> dict:
        """The sample {"__key__", "__url__", "jpg", "cls", "size"} of a row of the sample index: one positioned read
        of the shard's bytes [offset, offset + length); the JPEG's bytes (a view of them), the label and the size
        (None where the indexer could not read it) as the row gives them; the key from the first tar header. The
        header's checksum guards against a shard that is not the one indexed; the tar is parsed whole only where
        that header is not a member's own (a name too long for it)."""
        shard, offset, length = int(row["shard"]), int(row["offset"]), int(row["length"])
        jpg_offset, jpg_length = int(row["jpg_offset"]), int(row["jpg_length"])
        url = self.urls[shard]
        where = f"{url}: bytes {offset}..{offset + length}"
        fix = "the shard does not match its index: check it with python -m pipeline.shards verify"
        data = os.pread(self._fd(shard), length, offset)
        if len(data) < length or jpg_offset < tarfile.BLOCKSIZE or jpg_offset + jpg_length > length:
            raise ValueError(f"{where} do not hold the sample its index row describes; {fix}")
        try:
            header = tarfile.TarInfo.frombuf(data[:tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
            name = header.name if header.isreg() else self._first_name(data)
        except tarfile.TarError as err:
            raise ValueError(f"{where} are not a sample ({err}); {fix}") from None
        width, height = int(row["width"]), int(row["height"])
        return {"__key__": wds.tariterators.base_plus_ext(name)[0], "__url__": url,
                "jpg": memoryview(data)[jpg_offset: jpg_offset + jpg_length], "cls": b"%d" % int(row["label"]),
                "size": (width, height) if width and height else None}

    @staticmethod
    def _first_name(data: bytes) -> str:
        """The full name of the first member of a sample's bytes (through its pax or GNU long-name header)."""
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return tar.next().name

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
