//! The protobuf codec of the agent protocol, sized for a controller that
//! holds thousands of long-lived streams. tonic's default keeps an 8 KiB
//! encode buffer and an 8 KiB decode buffer per stream, batches messages up
//! to 32 KiB before handing them to HTTP/2, and grows the encode buffer by
//! doubling: at 1,000 streams that was over 100 MiB of the zone
//! controller's peak heap during a ramp-up (docs/benchmarks.md).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::ProstCodec;

/// Initial capacity of a stream's decode buffer: an ack or a small update
/// fits; a larger message reserves exactly what it needs.
const DECODE_BUFFER_BYTES: usize = 1024;

/// Initial capacity of a stream's encode buffer: the zone's largest config
/// message (2 KiB, `MAX_MESSAGE_BYTES` in the zone's views) with its gRPC
/// and protobuf framing. The buffer keeps its largest size for the
/// stream's life; one that starts large enough is reused as it is instead
/// of growing by doubling (to twice the largest message) the first time a
/// larger one comes.
pub const ENCODE_BUFFER_BYTES: usize = 2 * 1024 + 64;

/// Hand each message to HTTP/2 as soon as it is encoded instead of
/// batching: a stream then holds at most one message in its buffer.
const YIELD_AFTER_BYTES: usize = 1;

fn decode_settings() -> BufferSettings {
    BufferSettings::new(DECODE_BUFFER_BYTES, YIELD_AFTER_BYTES)
}

fn encode_settings() -> BufferSettings {
    BufferSettings::new(ENCODE_BUFFER_BYTES, YIELD_AFTER_BYTES)
}

/// `application/grpc+proto` through prost, with small per-stream buffers
/// and exact reservations (generated code names it through
/// `codec_path` in build.rs).
#[derive(Debug)]
pub struct ControlCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ControlCodec<T, U> {
    fn default() -> Self {
        ControlCodec(PhantomData)
    }
}

impl<T, U> Codec for ControlCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ExactEncoder<T>;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ExactEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(decode_settings())
    }
}

/// Encodes a message after reserving its exact length, so that the
/// buffer grows once to the message's size rather than by doubling.
#[derive(Debug)]
pub struct ExactEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ExactEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        encode_settings()
    }
}
