//! Completion: what each finished operation means for its request (continuations, fallbacks,
//! PI verification, mutation detection, rewrites and re-reads), and the status byte.

use super::*;

impl Executor {
    pub(super) fn on_completion(&mut self, completion: Completion, done: &mut Vec<UsedEntry>) {
        let (slot, aux) = untag(completion.tag);
        let Some(inflight) = self
            .requests
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        else {
            tracing::error!(tag = completion.tag, "completion for an unknown request");
            return;
        };
        inflight.pending_ops -= 1;
        if completion.result.is_ok() && inflight.stage == Stage::Transfer {
            if let PiWork::Ranges { zeroed, .. } = &mut inflight.pi {
                if let Some(z) = zeroed.get_mut((aux & !TRIED_PUNCH) as usize) {
                    *z = true;
                }
            }
        }
        if let Err(errno) = completion.result {
            let retries = self.fallback(slot, aux, errno);
            if retries.is_empty() {
                let inflight = self.requests[slot as usize].as_mut().expect("live request");
                // Discards are hints: a target that cannot punch holes still completes OK.
                if !(errno == libc::EOPNOTSUPP && inflight.class == Class::Discard) {
                    inflight.errno.get_or_insert(errno);
                }
                self.segment_failed(slot, aux);
            } else {
                let mut queued = true;
                for op in retries {
                    if self.queue_op(slot, op).is_err() {
                        queued = false; // queue_op recorded the error
                        break;
                    }
                }
                if queued {
                    return;
                }
                self.segment_failed(slot, aux);
            }
        }
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        if inflight.pending_ops > 0 {
            return;
        }
        if inflight.stage == Stage::Transfer
            && inflight.errno.is_none()
            && self.detect_mutation(slot)
        {
            self.deferred.push_back(Deferred::Rewrite(slot));
            return;
        }
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        if matches!(inflight.stage, Stage::Transfer | Stage::Rewrite)
            && inflight.sync_after_write
            && inflight.errno.is_none()
        {
            inflight.stage = Stage::SyncAfterWrite;
            if self.queue_op(slot, Op::sync(0)).is_ok() {
                return;
            }
        }
        let inflight = self.requests[slot as usize].take().expect("live request");
        self.free_requests.push(slot);
        self.complete(inflight, done);
    }

    /// Write-zeroes degrades gracefully: zero-range → punch-hole → writing zeroes. Returns
    /// the operations that try segment `aux` the next way (none: the failure stands).
    pub(super) fn fallback(&mut self, slot: u32, aux: u32, errno: i32) -> Vec<Op> {
        if errno != libc::EOPNOTSUPP {
            return Vec::new();
        }
        let Some(inflight) = self.requests[slot as usize].as_ref() else {
            return Vec::new();
        };
        if inflight.class != Class::WriteZeroes || inflight.stage != Stage::Transfer {
            return Vec::new();
        }
        let Some(&segment) = inflight.segments.get((aux & !TRIED_PUNCH) as usize) else {
            return Vec::new();
        };
        let offset = segment.sector * SECTOR_SIZE;
        let len = u64::from(segment.sectors) * SECTOR_SIZE;
        if aux & TRIED_PUNCH == 0 {
            return vec![Op::range(
                OpKind::PunchHole,
                offset,
                len,
                u64::from(aux | TRIED_PUNCH),
            )];
        }
        // Neither fallocate mode works here (e.g. a block device without zeroing support):
        // write real zeroes, one shared read-only buffer repeated. One write takes at most
        // MAX_IOVECS of them (1 GiB) and a segment may be larger (the device advertises up
        // to 2 GiB), so a segment is as many writes as it needs, all tagged with it; it
        // reads as zeros once all succeeded (see `segment_failed`).
        let zeroes = self
            .zeroes
            .get_or_insert_with(|| AlignedBuf::zeroed(ZERO_CHUNK));
        let base = zeroes.as_mut_ptr() as *mut libc::c_void;
        let per_write = (MAX_IOVECS * ZERO_CHUNK) as u64;
        (0..len.div_ceil(per_write))
            .map(|w| {
                let start = w * per_write;
                let piece = (len - start).min(per_write);
                let iovecs = (0..piece.div_ceil(ZERO_CHUNK as u64))
                    .map(|i| libc::iovec {
                        iov_base: base,
                        iov_len: (piece - i * ZERO_CHUNK as u64).min(ZERO_CHUNK as u64) as usize,
                    })
                    .collect();
                Op::transfer(OpKind::Write, offset + start, iovecs, u64::from(aux))
            })
            .collect()
    }

    /// An operation of range segment `aux` failed for good: the segment does not count as
    /// zeroed even if another of its operations succeeds.
    fn segment_failed(&mut self, slot: u32, aux: u32) {
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        if inflight.stage != Stage::Transfer {
            return; // a sync after the zeroing: not a segment's operation
        }
        if let PiWork::Ranges { failed, .. } = &mut inflight.pi {
            if let Some(f) = failed.get_mut((aux & !TRIED_PUNCH) as usize) {
                *f = true;
            }
        }
    }

    /// A request's last operation finished: do its PI work, release what it holds, and
    /// write its status. Reads that fail verification are set aside for a locked re-read.
    pub(super) fn complete(&mut self, mut inflight: InFlight, done: &mut Vec<UsedEntry>) {
        let mut status = VIRTIO_BLK_S_OK;
        if let Some(pi) = self.pi.clone() {
            if inflight.errno.is_none() && inflight.class == Class::Read {
                // Tuples from pages the metadata file lost are stand-in zeros: an I/O error,
                // never a guard error.
                if let Err(e) = pi.meta.intact() {
                    inflight.errno = e.raw_os_error().or(Some(libc::EIO));
                }
            }
            if inflight.errno.is_none() && inflight.class == Class::Read {
                if let PiWork::Read { count, .. } = &inflight.pi {
                    self.counters.intervals_verified.add(*count);
                }
                let verified = match (&inflight.pi, &inflight.data) {
                    (PiWork::Read { lba, .. }, DataPath::Bounce { bounce, .. }) => {
                        let per_chunk = (CHUNK / pi.interval() as usize) as u64;
                        self.pool
                            .pieces(bounce)
                            .iter()
                            .enumerate()
                            .all(|(i, piece)| {
                                protected::verify_buffer(&pi, piece, lba + i as u64 * per_chunk)
                                    .is_empty()
                            })
                    }
                    (PiWork::Read { lba, guest, .. }, _) => {
                        protected::verify_guest(&pi, &inflight.mem, guest, *lba).is_ok()
                    }
                    _ => true,
                };
                if !verified {
                    // The re-read brings its own buffer: give the pool chunks back now, so
                    // deferred work never holds any (see take_bounce).
                    if let DataPath::Bounce { bounce, guest } =
                        std::mem::replace(&mut inflight.data, DataPath::None)
                    {
                        self.pool.give_back(bounce);
                        if let PiWork::Read { guest: g, .. } = &mut inflight.pi {
                            *g = guest;
                        }
                    }
                    self.deferred.push_back(Deferred::Retry(Box::new(inflight)));
                    return;
                }
            }
            if let Err(e) = self.finish_protected(&pi, &mut inflight) {
                inflight
                    .errno
                    .get_or_insert(e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
        if let Some(errno) = inflight.errno {
            self.counters.io_errors.add(1);
            if let Some(left_out) = self.io_error_log.allow(self.clock) {
                tracing::warn!(
                    head = inflight.head,
                    error = %io::Error::from_raw_os_error(errno),
                    left_out,
                    "I/O failed; completing the request with IOERR (left_out: failures not logged since the last line)"
                );
            }
            status = VIRTIO_BLK_S_IOERR;
        } else if let DataPath::Bounce { bounce, guest } = &inflight.data {
            // Reads through a bounce buffer land in guest memory only now. (For writes the
            // guest ranges were gathered before submission and this copies nothing back.)
            if inflight.class == Class::Read
                && guest_mem::copy_to_guest(&inflight.mem, guest, &self.pool.pieces(bounce))
                    .is_err()
            {
                status = VIRTIO_BLK_S_IOERR;
            }
        }
        done.push(self.write_status(&mut inflight, status));
    }

    /// Write the status byte and recycle the request's buffer.
    pub(super) fn write_status(&mut self, inflight: &mut InFlight, status: u8) -> UsedEntry {
        self.counters.complete(
            inflight.class.operation(),
            status == VIRTIO_BLK_S_OK,
            inflight.bytes,
            self.clock.saturating_duration_since(inflight.started),
        );
        let written = inflight.mem.write_obj(status, inflight.status).is_ok();
        if let DataPath::Bounce { bounce, .. } =
            std::mem::replace(&mut inflight.data, DataPath::None)
        {
            self.pool.give_back(bounce);
        }
        if let Some(bounce) = inflight.rewrite.take() {
            self.pool.give_back(bounce);
        }
        UsedEntry {
            head: inflight.head,
            len: if written { inflight.used_len } else { 0 },
        }
    }

    /// PI bookkeeping when a write, zeroing or flush finishes: store (or re-derive) tuples,
    /// make them durable where the cache mode or the flush demands, end write intents and
    /// release the range lock.
    pub(super) fn finish_protected(
        &mut self,
        pi: &PiStore,
        inflight: &mut InFlight,
    ) -> io::Result<()> {
        let per = u64::from(pi.interval()) / SECTOR_SIZE;
        let succeeded = inflight.errno.is_none();
        let result = match std::mem::replace(&mut inflight.pi, PiWork::None) {
            PiWork::None | PiWork::Read { .. } => Ok(()),
            PiWork::Write { lba, guards, .. } => {
                let (stored, result) = protected::finish_write(
                    pi,
                    &self.image,
                    lba,
                    &guards,
                    succeeded,
                    inflight.sync_after_write,
                );
                self.counters.intervals_written.add(stored);
                result
            }
            PiWork::Ranges { zeroed, failed } => {
                let ranges: Vec<protected::RangeOutcome> = inflight
                    .segments
                    .iter()
                    .zip(zeroed.into_iter().zip(failed))
                    .map(|(segment, (zeroed, failed))| protected::RangeOutcome {
                        lba: segment.sector / per,
                        count: u64::from(segment.sectors) / per,
                        zeroed: zeroed && !failed,
                    })
                    .collect();
                // A discard the target did not perform changes nothing; a zeroing that did
                // not finish, or any failed request, leaves content not known.
                let uncertain = inflight.class == Class::WriteZeroes || !succeeded;
                protected::finish_ranges(
                    pi,
                    &self.image,
                    &ranges,
                    uncertain,
                    inflight.sync_after_write,
                )
            }
            PiWork::Flush { ticket } if succeeded => protected::finish_flush(pi, ticket),
            PiWork::Flush { .. } => Ok(()),
        };
        if let Some((start, end)) = inflight.locked.take() {
            pi.ranges.unlock(start, end);
        }
        result
    }

    /// After a zero-copy write's data is on disk: compute its guards over guest memory again.
    /// Intervals whose guard changed were modified by the guest while the disk was reading
    /// them, so the disk may hold any mix: mark them for a rewrite from a snapshot (returns
    /// true), and remember the guest pages and disk region so later writes there bounce up
    /// front. A buffer changed and changed back during the write (A→B→A) passes this check;
    /// see docs/MUTATION.md and `--bounce always`.
    pub(super) fn detect_mutation(&mut self, slot: u32) -> bool {
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        if !matches!(
            inflight.pi,
            PiWork::Write {
                mode: WriteMode::ZeroCopyChecked,
                ..
            }
        ) {
            return false;
        }
        let (format, interval) = match &self.pi {
            Some(pi) => (pi.format(), pi.interval() as usize),
            None => return false,
        };
        let PiWork::Write {
            mode: WriteMode::ZeroCopyChecked,
            guest,
            digests,
            rewriting,
            sampled_ns,
            ..
        } = &mut inflight.pi
        else {
            return false;
        };
        let started = sampled_ns.map(|_| policy::stopwatch());
        let mut now = Vec::with_capacity(digests.len());
        protected::guest_digests(&inflight.mem, guest, format, interval, None, &mut now);
        rewriting.extend((0..digests.len()).filter(|&i| now.get(i) != Some(&digests[i])));
        if let (Some(before), Some(started)) = (sampled_ns.take(), started) {
            let spent = before + policy::elapsed_ns(started);
            let len = (digests.len() * interval) as u64;
            let mutated = !rewriting.is_empty();
            // A write the guest changed costs a rewrite, but that is the guest's doing, not
            // the path's: only clean samples teach the model.
            if !mutated {
                self.record_cost(len, WritePath::ZeroCopy, spent);
                return false;
            }
        }
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        let PiWork::Write {
            lba,
            guest,
            rewriting,
            ..
        } = &mut inflight.pi
        else {
            return false;
        };
        if rewriting.is_empty() {
            return false;
        }
        inflight.stage = Stage::Rewrite;
        self.counters.writes_rewritten.add(1);
        self.counters
            .intervals_rewritten
            .add(rewriting.len() as u64);
        for &i in rewriting.iter() {
            let start = (i * interval) as u64;
            for byte in [start, start + interval as u64 - 1] {
                if let Some(gpa) = guest_mem::guest_address(guest, byte) {
                    self.tracker.mark_page(gpa);
                }
            }
            self.tracker
                .mark_region((*lba + i as u64) * interval as u64);
        }
        tracing::debug!(
            lba = *lba,
            intervals = rewriting.len(),
            "guest changed a zero-copy write in flight; rewriting from a snapshot"
        );
        true
    }

    /// Rewrite the intervals `detect_mutation` found from a snapshot: copy them out of guest
    /// memory into a pool buffer with their guards computed in the same pass, write them, and
    /// only then (with the other intervals' original guards) store the tuples and complete.
    /// Whatever the guest does next, disk and tuples agree.
    pub(super) fn rewrite(&mut self, slot: u32, done: &mut Vec<UsedEntry>) {
        let pi = self.pi.clone().expect("only PI writes are rewritten");
        let interval = pi.interval() as usize;
        let count = match self.requests[slot as usize].as_ref().map(|r| &r.pi) {
            Some(PiWork::Write { rewriting, .. }) => rewriting.len(),
            _ => return,
        };
        let bounce = self.take_bounce(count * interval, done);
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        let PiWork::Write {
            lba,
            guards,
            guest,
            rewriting,
            ..
        } = &mut inflight.pi
        else {
            unreachable!("checked above")
        };
        let mut dst = self.pool.slices_mut(&bounce);
        let fresh = protected::snapshot_intervals(
            &inflight.mem,
            guest,
            rewriting,
            &mut dst,
            pi.format(),
            interval,
        );
        let mut ops = Vec::with_capacity(count);
        for (j, (&i, guard)) in rewriting.iter().zip(fresh).enumerate() {
            guards[i] = guard;
            let offset = (*lba + i as u64) * interval as u64;
            let iov = self.pool.iovec_at(&bounce, j * interval, interval);
            ops.push(Op::transfer(OpKind::Write, offset, vec![iov], 0));
        }
        inflight.rewrite = Some(bounce);
        for op in ops {
            if self.queue_op(slot, op).is_err() {
                break;
            }
        }
        let inflight = self.requests[slot as usize].as_ref().expect("live request");
        if inflight.pending_ops == 0 {
            // Nothing could be queued (queue_op recorded the error): finish now with IOERR.
            let inflight = self.requests[slot as usize].take().expect("live request");
            self.free_requests.push(slot);
            self.complete(inflight, done);
        } else {
            self.submit();
        }
    }

    /// A read whose data did not verify: re-read it with the range locked (no write can be
    /// in flight there) into a buffer and verify again. If that verifies, the first read
    /// raced a write or the guest changed its buffer: hand over the verified data. If not,
    /// it is a real guard error: report every failing interval and complete with IOERR.
    pub(super) fn retry_read(&mut self, mut inflight: InFlight, done: &mut Vec<UsedEntry>) {
        let pi = self.pi.clone().expect("only PI reads are retried");
        let PiWork::Read { lba, count, .. } = inflight.pi else {
            unreachable!("only reads are retried")
        };
        self.lock_range(&pi, lba, lba + count, done);
        let status = match protected::read_intervals(&self.image, &pi, lba, count) {
            Err(e) => {
                tracing::warn!(lba, count, error = %e, "re-reading a block that failed verification failed");
                self.counters.io_errors.add(1);
                VIRTIO_BLK_S_IOERR
            }
            Ok(buffer) => {
                let mut failures = protected::verify_buffer(&pi, buffer.as_slice(), lba);
                // A range a write failed on (and that could not be read back then) holds
                // whatever the torn write left: re-derive it rather than call it corrupt.
                if !failures.is_empty() && pi.heal_suspect(&self.image, lba, count) {
                    failures = protected::verify_buffer(&pi, buffer.as_slice(), lba);
                }
                if failures.is_empty() {
                    self.counters.read_retries_healed.add(1);
                    let PiWork::Read { guest, .. } = &inflight.pi else {
                        unreachable!("checked above")
                    };
                    if guest_mem::copy_to_guest(&inflight.mem, guest, &[buffer.as_slice()]).is_ok()
                    {
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    }
                } else if pi.meta.intact().is_err() {
                    self.counters.io_errors.add(1);
                    VIRTIO_BLK_S_IOERR
                } else {
                    pi.report_all(&failures, "read");
                    for (_, e) in &failures {
                        self.counters.pi_error(e.kind);
                    }
                    self.counters.guard_errors.add(1);
                    self.counters.io_errors.add(1);
                    VIRTIO_BLK_S_IOERR
                }
            }
        };
        pi.ranges.unlock(lba, lba + count);
        self.clock = std::time::Instant::now(); // the re-read took a while
        done.push(self.write_status(&mut inflight, status));
    }
}
