//! Planning: a validated request becomes storage operations, zero-copy or through a bounce
//! buffer, with its PI steps (guards, write intents, range locks) taken before submission.

use super::*;

impl Executor {
    pub(super) fn plan(
        &mut self,
        request: Request,
        mem: &Arc<GuestMemoryMmap>,
        write_through: bool,
        done: &mut Vec<UsedEntry>,
    ) -> io::Result<()> {
        let Request { head, kind, status } = request;
        let mut inflight = InFlight {
            head,
            status,
            used_len: 1,
            mem: Arc::clone(mem),
            data: DataPath::None,
            pending_ops: 0,
            errno: None,
            stage: Stage::Transfer,
            sync_after_write: false,
            segments: Vec::new(),
            class: Class::Flush,
            pi: PiWork::None,
            locked: None,
            rewrite: None,
            started: self.clock,
            bytes: 0,
        };
        let pi = self.pi.clone();
        // Each op's `tag` holds its index within the request until queue_op adds the slot.
        let ops: Vec<Op> = match kind {
            RequestKind::GetId { buffer, len } => {
                let wrote = guest_mem::copy_to_guest(mem, &buffer, &[&self.serial[..]]).is_ok();
                let status_byte = if wrote {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                let _ = mem.write_obj(status_byte, status);
                let id_len = u64::from(VIRTIO_BLK_ID_BYTES).min(len) as u32;
                done.push(UsedEntry {
                    head,
                    len: id_len + 1,
                });
                return Ok(());
            }
            RequestKind::Read { sector, data, len } => {
                inflight.class = Class::Read;
                inflight.bytes = len;
                inflight.used_len = (len + 1) as u32;
                let offset = sector * SECTOR_SIZE;
                if let Some(pi) = &pi {
                    let interval = u64::from(pi.interval());
                    let (lba, count) = (offset / interval, len / interval);
                    pi.meta.prefetch_tuples(lba, count);
                    inflight.pi = PiWork::Read {
                        lba,
                        count,
                        guest: data.clone(),
                    };
                }
                let iovecs = self.data_path(&mut inflight, data, len, offset, false, done);
                if let (DataPath::Bounce { .. }, PiWork::Read { guest, .. }) =
                    (&inflight.data, &mut inflight.pi)
                {
                    guest.clear(); // verified in the buffer instead
                }
                vec![Op::transfer(OpKind::Read, offset, iovecs, 0)]
            }
            RequestKind::Write { sector, data, len } => {
                inflight.class = Class::Write;
                inflight.bytes = len;
                inflight.sync_after_write = write_through;
                let offset = sector * SECTOR_SIZE;
                match &pi {
                    Some(pi) => {
                        match self.protected_write(pi, &mut inflight, data, len, offset, done) {
                            Ok(iovecs) => vec![Op::transfer(OpKind::Write, offset, iovecs, 0)],
                            Err(e) => metadata_failed(&mut inflight, e),
                        }
                    }
                    None => {
                        let iovecs = self.data_path(&mut inflight, data, len, offset, true, done);
                        vec![Op::transfer(OpKind::Write, offset, iovecs, 0)]
                    }
                }
            }
            RequestKind::Flush => {
                if let Some(pi) = &pi {
                    inflight.pi = PiWork::Flush {
                        ticket: pi.meta.flush_ticket(),
                    };
                }
                vec![Op::sync(0)]
            }
            RequestKind::Discard { segments } => {
                inflight.class = Class::Discard;
                let mut ops = range_ops(&segments, |_| OpKind::PunchHole);
                if let Some(pi) = &pi {
                    if let Err(e) = self.protect_ranges(pi, &mut inflight, &segments, done) {
                        ops = metadata_failed(&mut inflight, e);
                    }
                }
                inflight.segments = segments;
                ops
            }
            RequestKind::WriteZeroes { segments } => {
                inflight.sync_after_write = write_through;
                inflight.class = Class::WriteZeroes;
                let mut ops = range_ops(&segments, |s| {
                    if s.unmap {
                        OpKind::PunchHole
                    } else {
                        OpKind::ZeroRange
                    }
                });
                if let Some(pi) = &pi {
                    if let Err(e) = self.protect_ranges(pi, &mut inflight, &segments, done) {
                        ops = metadata_failed(&mut inflight, e);
                    }
                }
                inflight.segments = segments;
                ops
            }
        };

        self.counters.in_flight.add(1);
        if inflight.errno.is_some() {
            // Failed before any I/O (the PI metadata could not record the write intent).
            self.complete(inflight, done);
            return Ok(());
        }
        let slot = self.insert(inflight);
        for op in ops {
            if let Err(e) = self.queue_op(slot, op) {
                // Whatever was queued completes normally; if nothing was, finish now (IOERR:
                // queue_op recorded the failure) so the guest is not left waiting.
                if self.requests[slot as usize]
                    .as_ref()
                    .is_some_and(|r| r.pending_ops == 0)
                {
                    let inflight = self.requests[slot as usize].take().expect("checked above");
                    self.free_requests.push(slot);
                    self.complete(inflight, done);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Decide zero-copy or bounce for a read/write and return the iovecs to hand the kernel.
    pub(super) fn data_path(
        &mut self,
        inflight: &mut InFlight,
        data: Vec<GuestRange>,
        len: u64,
        offset: u64,
        is_write: bool,
        done: &mut Vec<UsedEntry>,
    ) -> Vec<libc::iovec> {
        let iovecs = guest_mem::host_iovecs(&inflight.mem, &data);
        if self.direct_ok(offset, &iovecs) {
            inflight.data = DataPath::ZeroCopy;
            return iovecs;
        }
        // Misaligned for O_DIRECT (or too fragmented): go through an aligned buffer.
        self.counters.bounced.add(1);
        let bounce = self.take_bounce(len as usize, done);
        if is_write {
            let mut dst = self.pool.slices_mut(&bounce);
            guest_mem::copy_from_guest(&inflight.mem, &data, &mut dst)
                .expect("range validated against this memory snapshot");
        }
        let iov = self.pool.iovecs(&bounce);
        inflight.data = DataPath::Bounce {
            bounce,
            guest: data,
        };
        iov
    }

    pub(super) fn direct_ok(&self, offset: u64, iovecs: &[libc::iovec]) -> bool {
        iovecs.len() <= MAX_IOVECS && self.image.accepts_direct(offset, iovecs)
    }

    /// Whether this write touches guest pages or a disk region where a guest recently changed
    /// a buffer in flight (the `auto` policy bounces those up front).
    pub(super) fn mutation_expected(&self, data: &[GuestRange], offset: u64, len: u64) -> bool {
        let pages = data.iter().map(|r| (r.addr.0, u64::from(r.len)));
        self.tracker.write_expects_mutation(pages, offset, len)
    }

    /// A write to a PI disk. Zero-copy (the default for well-behaved guests): guards are
    /// computed over guest memory, the data goes to disk straight from it, and after it
    /// completes the guards are computed again — intervals the guest changed meanwhile are
    /// rewritten from a snapshot before the guest is told (see `rewrite`). Bounced (policy,
    /// recent mutation there, or misalignment): the data is copied into a pool buffer with each
    /// interval's guard computed in the same pass. Either way the range is locked and the write
    /// intent recorded first, and the tuples are stored when the data is on disk: they describe
    /// exactly the bytes that reached it.
    pub(super) fn protected_write(
        &mut self,
        pi: &Arc<PiStore>,
        inflight: &mut InFlight,
        data: Vec<GuestRange>,
        len: u64,
        offset: u64,
        done: &mut Vec<UsedEntry>,
    ) -> io::Result<Vec<libc::iovec>> {
        let interval = u64::from(pi.interval());
        let (lba, count) = (offset / interval, len / interval);
        pi.meta.prefetch_tuples(lba, count);
        let iovecs = guest_mem::host_iovecs(&inflight.mem, &data);
        let direct = self.direct_ok(offset, &iovecs);
        let mut by_cost = false;
        let mut sample = false;
        let mode = match self.policy {
            _ if !direct => WriteMode::Bounced,
            WritePolicy::Always => WriteMode::Bounced,
            WritePolicy::Never => WriteMode::ZeroCopyChecked,
            WritePolicy::Unchecked => WriteMode::ZeroCopyUnchecked,
            WritePolicy::Auto if self.mutation_expected(&data, offset, len) => WriteMode::Bounced,
            WritePolicy::Auto => {
                let choice = self.costs.choose(len);
                sample = choice.sample;
                match choice.path {
                    WritePath::ZeroCopy => WriteMode::ZeroCopyChecked,
                    WritePath::Bounce => {
                        by_cost = true;
                        WriteMode::Bounced
                    }
                }
            }
        };
        // Lock before buffer (see lock_range): whoever holds chunks never waits for a lock.
        self.lock_range(pi, lba, lba + count, done);
        inflight.locked = Some((lba, lba + count));
        let bounce = (mode == WriteMode::Bounced).then(|| self.take_bounce(len as usize, done));
        if let Err(e) = protected::begin_writes(pi, &[(lba, count)]) {
            if let Some(bounce) = bounce {
                self.pool.give_back(bounce);
            }
            return Err(e);
        }
        // Timed from here: the path's own work, not waiting for the pool or for a write
        // intent to become durable (the same for both paths, and occasionally long).
        let started = sample.then(policy::stopwatch);
        let mut guards = Vec::with_capacity(count as usize);
        let mut digests = Vec::new();
        let mut sampled_ns = None;
        let (iov, guest) = match bounce {
            Some(bounce) => {
                if direct {
                    self.counters.writes_bounced.add(1);
                    if by_cost {
                        self.counters.writes_bounced_by_cost.add(1);
                    }
                } else {
                    self.counters.bounced.add(1);
                }
                let mut dst = self.pool.slices_mut(&bounce);
                protected::gather_with_guards(
                    &inflight.mem,
                    &data,
                    &mut dst,
                    pi.format(),
                    interval as usize,
                    &mut guards,
                );
                let iov = self.pool.iovecs(&bounce);
                inflight.data = DataPath::Bounce {
                    bounce,
                    guest: Vec::new(),
                };
                if let Some(started) = started {
                    self.record_cost(len, WritePath::Bounce, policy::elapsed_ns(started));
                }
                (iov, Vec::new())
            }
            None => {
                self.counters.writes_zero_copy.add(1);
                protected::guest_digests(
                    &inflight.mem,
                    &data,
                    pi.format(),
                    interval as usize,
                    Some(&mut guards),
                    &mut digests,
                );
                sampled_ns = started.map(policy::elapsed_ns);
                inflight.data = DataPath::ZeroCopy;
                (iovecs, data)
            }
        };
        inflight.pi = PiWork::Write {
            lba,
            guards,
            mode,
            guest,
            digests,
            rewriting: Vec::new(),
            sampled_ns,
        };
        Ok(iov)
    }

    /// A sampled write's path work cost `nanos`: feed the cost model and publish its state.
    pub(super) fn record_cost(&mut self, len: u64, path: WritePath, nanos: u64) {
        self.costs.record(len, path, nanos);
        for (slot, state) in self.counters.write_path.iter().zip(self.costs.snapshot()) {
            slot.store(policy::pack(state), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Discard or write-zeroes on a PI disk: lock the span the segments cover (one lock, so
    /// two requests cannot each hold part of the other's) and record the write intents.
    pub(super) fn protect_ranges(
        &mut self,
        pi: &Arc<PiStore>,
        inflight: &mut InFlight,
        segments: &[Segment],
        done: &mut Vec<UsedEntry>,
    ) -> io::Result<()> {
        let per = u64::from(pi.interval()) / SECTOR_SIZE;
        let start = segments.iter().map(|s| s.sector / per).min().unwrap_or(0);
        let end = segments
            .iter()
            .map(|s| (s.sector + u64::from(s.sectors)) / per)
            .max()
            .unwrap_or(0);
        self.lock_range(pi, start, end, done);
        inflight.locked = Some((start, end));
        let ranges: Vec<(u64, u64)> = segments
            .iter()
            .map(|s| (s.sector / per, u64::from(s.sectors) / per))
            .collect();
        protected::begin_writes(pi, &ranges)?;
        inflight.pi = PiWork::Ranges {
            zeroed: vec![false; segments.len()],
            failed: vec![false; segments.len()],
        };
        Ok(())
    }
}
