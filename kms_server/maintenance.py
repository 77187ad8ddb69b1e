# Whole-store operations: rekey (new generation + atomic switch), backup, restore, verify.
# Blocking file I/O, used by `kmsd rekey|backup|restore|verify` and by the daemon's REKEY.
"""Operations on a whole store rather than one key.

Rekey re-seals every file of the live generation under a new KEK into a new
generation directory, fsyncs it, and switches the ``live`` link atomically.
A crash before the switch leaves the old generation live (the half-made one is
removed at the next open or by ``kmsd rekey --repair``); a crash after it
leaves the new one live (the old one is removed the same way). Either way the
store opens with exactly one of the two KEKs, and every key version is intact.

Backups are plain tar archives of the live generation: still sealed, so useless
without the KEK. They are taken under the store's write lock, so a running
daemon's writes wait for the snapshot and it is consistent.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kms_client.errors import BadRequest, KmsError
from kms_server.crypto import constant_time_equal, wipe
from kms_server.dispatch import Rekeyer, ThreadRunner
from kms_server.files import fsync_directory, make_private_dirs, temporary_path, write_fsynced
from kms_server.kek import KekError, KekFile, KekSource, PassphraseCommand, exposure_of
from kms_server.keys import CREATING
from kms_server.store import (
    KEYS_DIR,
    LOCK_NAME,
    METADATA_NAME,
    RESTORING_MARK,
    ROTATION_NAME,
    STATE_NAME,
    WRITE_LOCK_NAME,
    KeyState,
    KeyStore,
    Sealer,
    StoreError,
    StoreMetadata,
    check_private,
    file_name,
    generation_directory,
    kek_check_value,
    key_file_versions,
    live_generation,
    locked,
    read_erasing,
    read_metadata,
    remove_other_generations,
    switch_live,
    walk_key_ids,
    write_generation_skeleton,
)

log = logging.getLogger("kmsd.maintenance")

BACKUP_ROOT = "kms-backup"


def check_kek(metadata: StoreMetadata, kek: bytes | bytearray) -> None:
    expected = metadata.kek_check.encode()
    if not constant_time_equal(kek_check_value(kek, metadata.store_id).encode(), expected):
        raise StoreError("wrong KEK: it does not match the store's check value")


# --------------------------------------------------------------------------- rekey


def build_generation(
    store_dir: Path,
    old_sealer: Sealer,
    new_kek: bytes | bytearray,
    new_description: dict[str, object],
) -> tuple[Path, StoreMetadata, Sealer]:
    """Re-seal the live generation under ``new_kek`` into the next generation (not yet live).

    Call with the write lock held. Every file is fsync'ed before this returns.
    """
    old_generation = live_generation(store_dir)
    old_metadata = StoreMetadata.from_json((old_generation / METADATA_NAME).read_bytes())
    metadata = old_metadata.for_new_kek(new_kek, new_description)
    new_sealer = Sealer(new_kek, metadata.store_id)
    stale = generation_directory(store_dir, metadata.generation)
    if stale.exists():  # the remains of an interrupted rekey
        remove_other_generations(store_dir)
    generation = write_generation_skeleton(store_dir, metadata)
    old_keys, new_keys = old_generation / KEYS_DIR, generation / KEYS_DIR
    for key_id in walk_key_ids(old_keys):
        source = old_keys.joinpath(*key_id.split("/"))
        target = new_keys.joinpath(*key_id.split("/"))
        make_private_dirs(target, new_keys)
        state_path = source / STATE_NAME
        destroyed: set[int] = set()
        if state_path.exists():
            document = old_sealer.open_document(
                b"state", key_id, state_path.read_bytes(), state_path
            )
            state = KeyState.from_document(document)
            destroyed = state.destroyed()
            write_fsynced(target / STATE_NAME, new_sealer.seal_document(b"state", key_id, document))
        for number in key_file_versions(source):
            if number in destroyed:  # the remains of a DESTROY cut short: never carried on
                continue
            path = source / file_name(number)
            opened = old_sealer.open_key_file(key_id, number, path.read_bytes(), path)
            write_fsynced(target / file_name(number), new_sealer.seal_key_file(opened))
            opened.wipe()
        fsync_directory(target)
    rotation_path = old_generation / ROTATION_NAME
    if rotation_path.exists():
        document = old_sealer.open_document(
            b"rotation", "", rotation_path.read_bytes(), rotation_path
        )
        write_fsynced(
            generation / ROTATION_NAME, new_sealer.seal_document(b"rotation", "", document)
        )
    for directory, _, _ in os.walk(new_keys):
        fsync_directory(Path(directory))
    fsync_directory(generation)
    return generation, metadata, new_sealer


def rekey_offline(
    store_dir: Path,
    old_kek: bytes | bytearray,
    new_kek: bytes | bytearray,
    new_description: dict[str, object],
) -> int:
    """Rekey a store no daemon is serving. Returns the new generation number."""
    check_private(store_dir)
    with (
        locked(store_dir / LOCK_NAME, blocking=False),
        locked(store_dir / WRITE_LOCK_NAME, blocking=True),
    ):
        remove_other_generations(store_dir)
        metadata = read_metadata(store_dir)
        check_kek(metadata, old_kek)
        generation, new_metadata, _ = build_generation(
            store_dir, Sealer(old_kek, metadata.store_id), new_kek, new_description
        )
        switch_live(store_dir, generation)
        remove_other_generations(store_dir)
    return new_metadata.generation


def repair(store_dir: Path) -> list[str]:
    """Finish or roll back an interrupted rekey: keep the live generation, remove the rest."""
    check_private(store_dir)
    live_generation(store_dir)
    with locked(store_dir / LOCK_NAME, blocking=False):
        return remove_other_generations(store_dir)


# --------------------------------------------------------------------------- backup and restore


def backup(store_dir: Path, out: Path) -> int:
    """Write a tar snapshot of the live generation to ``out`` (0600); returns its file count."""
    check_private(store_dir)
    count = 0
    with locked(store_dir / WRITE_LOCK_NAME, blocking=True):
        generation = live_generation(store_dir)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for directory, dirs, names in os.walk(generation):
                dirs.sort()
                for name in sorted(names):
                    if name.startswith(".tmp-"):
                        continue
                    path = Path(directory) / name
                    arcname = f"{BACKUP_ROOT}/{path.relative_to(generation).as_posix()}"
                    info = tarfile.TarInfo(arcname)
                    data = path.read_bytes()
                    info.size = len(data)
                    info.mode = 0o600
                    archive.addfile(info, io.BytesIO(data))
                    count += 1
    temporary = temporary_path(out)
    try:
        write_fsynced(temporary, buffer.getvalue())
        os.replace(temporary, out)
        fsync_directory(out.parent)
    except OSError as error:  # a full disk names no file by itself: say which one
        temporary.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(out)) from None
    return count


def _read_backup(archive_path: Path) -> dict[str, bytes]:
    """The files of a backup by relative name; refuses anything but plain, contained files."""
    files: dict[str, bytes] = {}
    with tarfile.open(archive_path, mode="r") as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            extracted = archive.extractfile(member) if member.isfile() else None
            if (
                extracted is None
                or parts[0] != BACKUP_ROOT
                or len(parts) < 2
                or any(part in ("", ".", "..") for part in parts)
            ):
                raise StoreError(f"backup {archive_path} holds an unexpected entry {member.name!r}")
            files["/".join(parts[1:])] = extracted.read()
    return files


def restore(archive_path: Path, store_dir: Path) -> StoreMetadata:
    """Unpack a backup into a missing or empty ``store_dir`` as its live generation.

    A mark file says a restore is under way until it is whole, ``live`` included: a
    directory a restore cut short (killed, a full disk) holds that mark, which no
    daemon opens, and a new restore empties it (the mark last) and starts over,
    where any other content is refused. The directory itself is locked meanwhile: a
    second restore into it would take the first one's mark for a cut-short restore
    and empty the directory under it.
    """
    if store_dir.exists() and not store_dir.is_dir():
        raise StoreError(f"{store_dir} exists and is not a directory")
    try:
        files = _read_backup(archive_path)
    except OSError as exc:
        raise StoreError(f"cannot read backup {archive_path}: {exc.strerror or exc}") from None
    except tarfile.TarError:  # its text lists every compression it tried, one per line
        raise StoreError(f"cannot read backup {archive_path}: not a kmsd backup archive") from None
    if METADATA_NAME not in files:
        raise StoreError(f"backup {archive_path} holds no store metadata")
    metadata = StoreMetadata.from_json(files[METADATA_NAME])
    make_private_dirs(store_dir, Path(store_dir.anchor or "."))
    with locked(store_dir, blocking=False, busy=f"another restore into {store_dir} is under way"):
        entries = os.listdir(store_dir)
        if RESTORING_MARK in entries:  # a restore cut short: nothing there is a store yet
            for name in sorted(entries, key=lambda name: name == RESTORING_MARK):
                path = store_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            fsync_directory(store_dir)
        elif entries:
            raise StoreError(f"{store_dir} is not empty; restore needs an empty directory")
        os.chmod(store_dir, 0o700)
        write_fsynced(store_dir / RESTORING_MARK, b"")
        fsync_directory(store_dir)
        generation = generation_directory(store_dir, metadata.generation)
        generation.mkdir(mode=0o700)
        for name, data in sorted(files.items()):
            path = generation.joinpath(*name.split("/"))
            make_private_dirs(path.parent, generation)
            write_fsynced(path, data)
        for directory, _, _ in os.walk(generation):
            fsync_directory(Path(directory))
        switch_live(store_dir, generation)
        (store_dir / RESTORING_MARK).unlink()
        fsync_directory(store_dir)
    return metadata


# --------------------------------------------------------------------------- verify


@dataclass
class KeyReport:
    key_id: str
    versions: int = 0
    problems: list[str] = field(default_factory=list)


def verify(store_dir: Path, kek: bytes | bytearray) -> list[KeyReport]:
    """Open every key version and state file of the live generation; report per key."""
    metadata = read_metadata(store_dir)
    check_kek(metadata, kek)
    sealer = Sealer(kek, metadata.store_id)
    generation = live_generation(store_dir)
    reports = []
    rotation_path = generation / ROTATION_NAME
    if rotation_path.exists():
        report = KeyReport("(rotation index)")
        try:
            sealer.open_document(b"rotation", "", rotation_path.read_bytes(), rotation_path)
        except KmsError:
            report.problems.append(f"{ROTATION_NAME} does not open (edited or corrupted)")
        reports.append(report)
    try:  # DESTROYs a crash cut short: the daemon's next start erases their files
        erasing = set(read_erasing(generation))
    except OSError:
        erasing = set()
    keys_dir = generation / KEYS_DIR
    for key_id in sorted(walk_key_ids(keys_dir)):
        directory = keys_dir.joinpath(*key_id.split("/"))
        reports.append(_verify_key(sealer, key_id, directory, erasing=key_id in erasing))
    return reports


def _verify_key(sealer: Sealer, key_id: str, directory: Path, *, erasing: bool) -> KeyReport:
    """One key's seals, and its state against its files (``erasing``: a DESTROY of this
    key was cut short, so a destroyed version's file still there is no damage)."""
    report = KeyReport(key_id)
    files = key_file_versions(directory)
    state = KeyState()
    state_path = directory / STATE_NAME
    if not state_path.exists():
        report.problems.append(
            "state file missing (deleted?): served without it, every retired version would"
            " be active again; the daemon refuses the key"
        )
    else:
        try:
            state = KeyState.from_document(
                sealer.open_document(b"state", key_id, state_path.read_bytes(), state_path)
            )
        except KmsError:
            report.problems.append("state file does not open (edited, corrupted or swapped)")
        first = state.usage.get(1)
        if first is not None and first.state == CREATING and 1 not in files:
            return report  # a CREATE a crash cut short: no key, and a new CREATE replaces it
    for number in files:
        path = directory / file_name(number)
        try:
            sealer.open_key_file(key_id, number, path.read_bytes(), path).wipe()
        except KmsError:
            report.problems.append(
                f"version {number}: does not open (corrupted, truncated, or copied from "
                "another key or version)"
            )
    known = set(files) | set(state.usage)
    latest = max(known, default=0)
    all_destroyed = state.destroyed()
    for number in range(1, latest + 1):
        destroyed = number in all_destroyed
        if number not in files and not destroyed:
            report.problems.append(
                f"version {number}: file missing"
                + (" (a new CREATE replaces the key)" if not files else "")
            )
        if number in files and destroyed and not erasing:
            report.problems.append(f"version {number}: destroyed but its file is still there")
    report.versions = len(known)
    return report


# --------------------------------------------------------------------------- online rekey


def online_rekeyer(store: KeyStore, passphrase_timeout: float) -> Rekeyer:
    """The daemon's ``REKEY``: it obtains the new KEK itself (file or passphrase command),
    builds the next generation under the write lock, switches, and keeps serving.

    The KEK never crosses the socket; cached keys stay valid (their material is
    unchanged), new reads go to the new generation.
    """

    async def rekey(kind: str, argument: str, run_blocking: ThreadRunner[Any]) -> int:
        source: KekSource = (
            KekFile(Path(argument))
            if kind == "file"
            else PassphraseCommand(argument, passphrase_timeout, discard_stderr=True)
        )

        def work() -> tuple[Path, StoreMetadata, Sealer]:
            store_id = store.metadata.store_id
            description = source.describe_new(store_id)
            try:
                new_kek = source.obtain(description, store_id)
            except KekError as error:
                log.error("REKEY refused: %s", error)
                raise BadRequest("cannot obtain the new KEK; see the daemon log") from None
            try:
                with store.write_lock():
                    try:
                        built = build_generation(
                            store.directory, store.sealer, new_kek, description
                        )
                    except Exception:  # a full disk, a damaged key file: nothing switched
                        discard_unfinished_generation(store.directory)
                        raise
                    try:
                        switch_live(store.directory, built[0])
                    except OSError as error:
                        if not is_live(store.directory, built[0]):
                            discard_unfinished_generation(store.directory)
                            raise
                        # The rename happened; only making it durable failed. The new
                        # generation is the store now: serving the old one would write
                        # where no restart looks.
                        log.error("REKEY: generation switched, but its fsync failed: %s", error)
            finally:
                wipe(new_kek)
            return built

        built: tuple[Path, StoreMetadata, Sealer] = await run_blocking(work)
        generation, metadata, sealer = built
        store.adopt_generation(generation, metadata, sealer)
        log.info(
            "REKEY: store re-sealed under a new %s KEK, generation %d", kind, metadata.generation
        )
        if kind == "file" and (exposure := exposure_of(Path(argument))) is not None:
            log.warning("REKEY: %s", exposure)
        try:
            await run_blocking(lambda: remove_other_generations(store.directory))
        except (OSError, StoreError) as error:  # the rekey is done: the next start removes it
            log.error("REKEY: cannot remove the old generation: %s", error)
        return metadata.generation

    return rekey


def is_live(store_dir: Path, generation: Path) -> bool:
    """Whether ``live`` names ``generation`` (after a failed switch: did the rename happen?)."""
    try:
        return live_generation(store_dir) == generation
    except (OSError, StoreError):
        return False


def discard_unfinished_generation(store_dir: Path) -> None:
    """Remove a generation a failed online rekey left half-made (it may fill the disk)."""
    try:
        remove_other_generations(store_dir)
    except (OSError, StoreError) as error:
        log.error("REKEY: cannot remove the unfinished generation: %s", error)
