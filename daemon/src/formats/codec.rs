//! Decompression of the compressed units formats store (qcow2 clusters, VMDK grains): one place
//! for every codec, each bounded to the unit's size whatever the stream claims.
//!
//! A format module only says *that* a guest range is a compressed unit and where its bytes are
//! ([`super::layout::Chunk::Compressed`]); the shared reader calls [`decompress`].

/// How a compressed unit is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Raw deflate, no zlib header (qcow2's `compression_type` 0, zlib's `-12` window).
    Deflate,
    /// Deflate inside a zlib (RFC 1950) wrapper: VMDK's compressed grains.
    Zlib,
    /// A zstd frame (qcow2's `compression_type` 1).
    Zstd,
}

impl Codec {
    /// How users name it in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Deflate => "deflate",
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// Fills all of `unit` from the stream at the start of `compressed`, or says why not. As qemu's
/// decompressors: a stream that fills the unit is accepted whether or not its end marker
/// follows, and bytes after it (the next unit's, sharing a sector) are ignored.
pub fn decompress(codec: Codec, compressed: &[u8], unit: &mut [u8]) -> Result<(), String> {
    match codec {
        Codec::Deflate => inflate(compressed, unit, false),
        Codec::Zlib => inflate(compressed, unit, true),
        Codec::Zstd => unzstd(compressed, unit),
    }
}

fn inflate(compressed: &[u8], unit: &mut [u8], zlib_header: bool) -> Result<(), String> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;

    let mut state = Box::<DecompressorOxide>::default();
    let mut flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    if zlib_header {
        flags |= inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER;
    }
    // All input given at once, output one flat buffer.
    let (status, _, written) = decompress(&mut state, compressed, unit, 0, flags);
    if written == unit.len() && matches!(status, TINFLStatus::Done | TINFLStatus::HasMoreOutput) {
        Ok(())
    } else {
        Err(format!("{status:?} after {written} bytes"))
    }
}

/// Largest zstd window accepted (log2): qemu compresses one cluster (2 MiB at most) in one
/// call, so its frames never need more than 2 MiB; this bounds the decoder's memory at 4 MiB
/// whatever a crafted frame header asks for.
const ZSTD_WINDOW_LOG_MAX: u32 = 22;

/// As qemu's `qcow2_zstd_decompress`: the output must be filled and the frame complete;
/// trailing bytes are ignored.
fn unzstd(compressed: &[u8], unit: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

    let mut decoder = Decoder::new().map_err(|error| error.to_string())?;
    decoder
        .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(|error| error.to_string())?;
    let mut input = InBuffer::around(compressed);
    let mut output = OutBuffer::around(unit);
    let mut remaining = 1;
    while output.pos() < output.capacity() {
        let before = (input.pos(), output.pos());
        remaining = decoder
            .run(&mut input, &mut output)
            .map_err(|error| error.to_string())?;
        if (input.pos(), output.pos()) == before {
            return Err(format!("the stream stops after {} bytes", output.pos()));
        }
    }
    if remaining > 0 {
        return Err("the frame does not end with the unit".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 97) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    #[test]
    fn each_codec_round_trips_and_refuses_a_short_stream() {
        let plain = pattern(65536);
        let deflated = miniz_oxide::deflate::compress_to_vec(&plain, 6);
        let zlibbed = miniz_oxide::deflate::compress_to_vec_zlib(&plain, 6);
        let zstded = zstd::bulk::compress(&plain, 3).unwrap();
        for (codec, stream) in [
            (Codec::Deflate, &deflated),
            (Codec::Zlib, &zlibbed),
            (Codec::Zstd, &zstded),
        ] {
            let mut unit = vec![0u8; plain.len()];
            decompress(codec, stream, &mut unit).unwrap();
            assert_eq!(unit, plain, "{codec:?}");
            let mut unit = vec![0u8; plain.len()];
            let cut = &stream[..stream.len() / 2];
            assert!(decompress(codec, cut, &mut unit).is_err(), "{codec:?}");
            // A stream of one codec is not taken for another.
            let other = if codec == Codec::Zstd {
                Codec::Zlib
            } else {
                Codec::Zstd
            };
            assert!(decompress(other, stream, &mut unit).is_err(), "{codec:?}");
        }
    }
}
