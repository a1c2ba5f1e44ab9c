//! Weft's patch (see WEFT-PATCH.md at the crate's root): the initial
//! capacities of each new connection's codec buffers, settable once for the
//! whole process. hyper builds h2's connections itself and exposes no such
//! option, so a server that holds thousands of mostly idle connections (the
//! Weft zone controller: one config stream per agent) could not size them;
//! hyperium/h2#960 proposes per-builder options for the same buffers.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The initial capacities of a connection's codec buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecBuffers {
    /// The frame read buffer; grows to fit the frames read.
    pub read: usize,
    /// The frame write buffer; small frames grow it, and a value below the
    /// encoder's minimum (a frame head plus the size from which data is
    /// chained rather than copied) is raised to that minimum.
    pub write: usize,
    /// The HPACK decoder's scratch buffer for Huffman-coded strings; grows
    /// to fit them.
    pub hpack_scratch: usize,
}

impl Default for CodecBuffers {
    /// h2's own sizes.
    fn default() -> Self {
        CodecBuffers {
            read: 8 * 1024,
            write: 16 * 1024,
            hpack_scratch: 4096,
        }
    }
}

static READ: AtomicUsize = AtomicUsize::new(8 * 1024);
static WRITE: AtomicUsize = AtomicUsize::new(16 * 1024);
static HPACK_SCRATCH: AtomicUsize = AtomicUsize::new(4096);

/// Sets the buffer capacities of the connections made after the call, in
/// the whole process.
pub fn set_codec_buffers(buffers: CodecBuffers) {
    READ.store(buffers.read, Ordering::Relaxed);
    WRITE.store(buffers.write, Ordering::Relaxed);
    HPACK_SCRATCH.store(buffers.hpack_scratch, Ordering::Relaxed);
}

/// The capacities new connections get.
pub fn codec_buffers() -> CodecBuffers {
    CodecBuffers {
        read: READ.load(Ordering::Relaxed),
        write: WRITE.load(Ordering::Relaxed),
        hpack_scratch: HPACK_SCRATCH.load(Ordering::Relaxed),
    }
}
