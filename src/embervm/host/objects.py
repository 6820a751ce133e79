"""Image and snapshot files in the object store, by content hash, the manifest written last.

In a fleet an image is built on one host and every other host restores byte-identical files;
a VM suspended on one host resumes on another (issue #13, docs/FLEET.md). This module is the
mechanism: ``publish`` a set of local files to a ``BlobStore``, ``fetch`` it into a directory
on another host. (Which files, under which keys, and when, is the runtime's to decide.)

Object layout (keys inside the store, which may itself add a prefix)::

    objects/sha256/<hex>   one chunk of one or more files' data, named by the sha256 of its bytes
    <manifest_key>         the caller's key (e.g. images/<name>/<version>/manifest.json); JSON

Chunks. Files are sparse (a 2 GiB guest RAM file holds ~200 MiB; the base disk is 8 GiB with
~225 MiB of data), so holes are never read, sent or stored: a file is its logical size plus the
extents that hold data (``SEEK_DATA``/``SEEK_HOLE``). The extents are cut on a fixed grid of
file offsets (``chunk_size``, 16 MiB by default) and the data of each grid cell is one object.
A grid of offsets, not of data, keeps a change local: a suspend overlay that changed a little
re-uploads the cells it changed, and identical cells dedupe across files, images and hosts
(images share layers and base disks). An object that the store already has is not uploaded.

Manifest (``format`` "embervm-objects", ``version`` 1; canonical JSON: sorted keys, no spaces)::

    {"format": "embervm-objects", "version": 1,
     "meta": {...},                      the caller's, verbatim (plain JSON)
     "external": ["image.disk.qcow2"],   backing files the fetcher supplies itself (may be [])
     "files": [{"name": "disk.qcow2",    a plain file name (no "/", not "." or "..", no NUL)
                "size": 8589934592,      the logical size
                "mode": 384,             permission bits only (0o777 at most)
                "mtime_ns": 17331...,    restored on fetch (vmm.snapshot stamps big files' mtimes)
                "sha256": "<hex>",       of the whole logical file, holes read as zeros
                "role": "disk",          disk | layer | base | file (objects_manifest.ROLES)
                "backing": "l1.qcow2",   a qcow2's backing file: a name in files or external
                "extents": [[0, 196608], [1048576, 65536]],   [offset, length], sorted, disjoint
                "chunks": [["<hex>", 262144]]}, ...],         their data, concatenated, in order
     "manifest_sha256": "<hex>"}         sha256 of the canonical JSON of every other field

Why the manifest last: objects are written first and are immutable (a key is its content), so
a reader that finds a manifest finds every object it names; a publish that fails or is
cancelled midway leaves orphan objects (harmless; nothing collects them yet) and no manifest.
Overwriting a manifest key is one atomic put of the store.

Backing chains. An image's ``disk.qcow2`` is an overlay over layers down to the base disk, and
hosts build their own base disks (not byte-identical), so an image carries its whole chain:
``with_chain(files)`` adds it (``chain_of`` reads the qcow2 headers with
``vmm.rootview.backing_chain``). The manifest names each qcow2's backing file; ``fetch``
rewrites it to the fetched neighbour's absolute final path with ``qemu-img rebase -u`` (only
the header's name and format change: QEMU's own writer, ~5 ms, and it works before the
directory is renamed into place, which a hand-written header could too but would need to
re-lay the header extensions when the new name is longer). A qcow2 that names a backing file
the manifest does not list, or has an external data file, is refused: a fetched disk never
reaches outside its directory. ``external`` names a backing file that is not published (a
suspended VM's overlay over its image's disk, which the resuming host already caches).

The cache (``ObjectCache``, one per host): ``<root>/sha256/<ab>/<hex>``, each object downloaded
once per host, verified (length and sha256) before it is renamed into place; a download that
does not verify is deleted and the fetch fails. ``fetch`` then assembles the files from the
cache into ``.<dest>.tmp-<random>`` beside ``dest_dir``, hashing each whole logical file on the
way and comparing it with the manifest (a cache entry damaged since is found, removed and
named), fixes the qcow2 headers, sets modes and mtimes, fsyncs and renames the directory: it
appears whole or not at all. The fetched files are the host's own from then on, and the
snapshot's mtime stamps (docs/SNAPSHOTS.md) hold again.

Cost (2 cores, measured 2026-12-08): the whole-file sha256 reads no hole from disk but
hashes its zeros, ~0.6 s of CPU per GiB of logical size on each side; it dominates for big
sparse files (a 2 GiB RAM file with 200 MiB of data: publish 1.9 s, fetch 2.3 s, of which
~1.3 s each is the holes; the 8 GiB base disk: ~7 s each). Suspend files are small and dense.

Reading is bounded: the manifest at most ``MAX_MANIFEST_BYTES``, files, extents and chunk
lengths capped, the logical sizes at most the caller's ``max_bytes``, an object at most its
declared length; a manifest that is hostile or corrupt is refused with ``SnapshotError``, a
missing one is ``NotFoundError``.
"""

from embervm.host.objects_cache import ObjectCache
from embervm.host.objects_fetch import fetch, read_manifest
from embervm.host.objects_manifest import (
    FORMAT,
    MAX_MANIFEST_BYTES,
    OBJECT_PREFIX,
    ROLES,
    VERSION,
    ChunkRef,
    ObjectFile,
    ObjectManifest,
    object_key,
    parse_manifest,
)
from embervm.host.objects_publish import CHUNK_SIZE, TransferStats, chain_of, publish, with_chain

__all__ = [
    "CHUNK_SIZE",
    "FORMAT",
    "MAX_MANIFEST_BYTES",
    "OBJECT_PREFIX",
    "ROLES",
    "VERSION",
    "ChunkRef",
    "ObjectCache",
    "ObjectFile",
    "ObjectManifest",
    "TransferStats",
    "chain_of",
    "fetch",
    "object_key",
    "parse_manifest",
    "publish",
    "read_manifest",
    "with_chain",
]
