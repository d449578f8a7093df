//! A connection's unsent output: bytes the node produced (frames, peer-wire
//! messages) and piece blocks that stay in the file's map until the kernel
//! copies them into the socket. One `writev` sends many segments at once, so
//! a seed never copies a block in user space (before: map -> swarm buffer ->
//! connection buffer -> socket, with the buffers growing and shrinking).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::torrent::storage::View;
use crate::torrent::wire::PieceHeader;

/// Segments given to one `writev` at most (Linux allows 1024).
const MAX_IOV: usize = 128;
/// A sent byte buffer up to this capacity is kept for the next bytes;
/// a larger one (a big command answer) is freed.
const KEEP: usize = 256 * 1024;

enum Segment {
    Bytes(Vec<u8>),
    /// A `piece` message: its header, then `len` bytes of `view` at `offset`.
    Block {
        header: PieceHeader,
        view: View,
        offset: u64,
        len: usize,
    },
}

impl Segment {
    fn len(&self) -> usize {
        match self {
            Segment::Bytes(v) => v.len(),
            Segment::Block { header, len, .. } => header.len() + len,
        }
    }
}

#[derive(Default)]
pub struct OutQueue {
    segments: VecDeque<Segment>,
    /// Bytes of the front segment already written.
    head: usize,
    pending: usize,
    /// An emptied byte buffer, reused for the next bytes queued.
    spare: Vec<u8>,
}

impl OutQueue {
    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Appends whatever `f` writes into the queue's byte buffer.
    pub fn push_with(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        if !matches!(self.segments.back(), Some(Segment::Bytes(_))) {
            self.segments.push_back(Segment::Bytes(std::mem::take(&mut self.spare)));
        }
        let Some(Segment::Bytes(tail)) = self.segments.back_mut() else { unreachable!("pushed above") };
        let before = tail.len();
        f(tail);
        self.pending += tail.len() - before;
    }

    pub fn push_bytes(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.push_with(|out| out.extend_from_slice(bytes));
        }
    }

    /// Queues a `piece` message whose data is `len` bytes of `view` at
    /// `offset`, left in the map until written. False (nothing queued) if
    /// the view does not hold that range.
    pub fn push_block(&mut self, header: PieceHeader, view: View, offset: u64, len: usize) -> bool {
        if view.bytes(offset, len as u64).len() != len {
            return false;
        }
        self.pending += header.len() + len;
        self.segments.push_back(Segment::Block { header, view, offset, len });
        true
    }

    /// One `writev` of as many segments as it takes; returns the bytes written.
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<usize> {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        let mut skip = self.head;
        for segment in &self.segments {
            let parts: [&[u8]; 2] = match segment {
                Segment::Bytes(v) => [v, &[]],
                Segment::Block { header, view, offset, len } => [header, view.bytes(*offset, *len as u64)],
            };
            for part in parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                iov[n] = IoSlice::new(&part[skip..]);
                skip = 0;
                n += 1;
                if n == MAX_IOV {
                    break;
                }
            }
            if n == MAX_IOV {
                break;
            }
        }
        if n == 0 {
            return Ok(0);
        }
        let written = w.write_vectored(&iov[..n])?;
        self.advance(written);
        Ok(written)
    }

    fn advance(&mut self, mut written: usize) {
        self.pending -= written;
        while let Some(front) = self.segments.front() {
            let left = front.len() - self.head;
            if written < left {
                self.head += written;
                return;
            }
            // The front segment is all written (or empty): drop it.
            written -= left;
            self.head = 0;
            if let Some(Segment::Bytes(mut v)) = self.segments.pop_front()
                && v.capacity() <= KEEP
                && v.capacity() >= self.spare.capacity()
            {
                v.clear();
                self.spare = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `max` bytes per call.
    struct Trickle {
        got: Vec<u8>,
        max: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.max);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut total = 0;
            for b in bufs {
                let n = b.len().min(self.max - total);
                self.got.extend_from_slice(&b[..n]);
                total += n;
                if total == self.max {
                    break;
                }
            }
            Ok(total)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_and_mapped_blocks_come_out_in_order_through_partial_writes() {
        let path = std::env::temp_dir().join(format!("shardnet-outq-{}", std::process::id()));
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let view = View::of_file(&std::fs::File::open(&path).unwrap()).unwrap();
        for max in [1, 7, 13, 14, 4096, 70_000, 1 << 20] {
            let mut q = OutQueue::default();
            let mut expected = Vec::new();
            for i in 0..300usize {
                let (offset, len) = ((i * 331) % 90_000, (i * 97) % 5000);
                let header: PieceHeader = std::array::from_fn(|k| (i + k) as u8);
                if i % 3 == 0 {
                    q.push_bytes(&header[..i % 13]);
                    expected.extend_from_slice(&header[..i % 13]);
                }
                assert!(q.push_block(header, view.clone(), offset as u64, len));
                expected.extend_from_slice(&header);
                expected.extend_from_slice(&data[offset..offset + len]);
            }
            assert!(!q.push_block([0; 13], view.clone(), 99_999, 2), "past the end of the file");
            assert_eq!(q.pending(), expected.len());
            let mut w = Trickle { got: Vec::new(), max };
            while q.pending() > 0 {
                let n = q.write_to(&mut w).unwrap();
                assert!(n > 0);
            }
            assert_eq!(w.got, expected, "max {max}");
            assert_eq!(q.write_to(&mut w).unwrap(), 0);
            q.push_bytes(b"again");
            while q.pending() > 0 {
                q.write_to(&mut w).unwrap();
            }
            assert!(w.got.ends_with(b"again"));
        }
        std::fs::remove_file(&path).unwrap();
    }
}
