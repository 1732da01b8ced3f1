//! Re-encoding of GGUF tensors that would run on scalar code on the CPU.
//!
//! candle, under mistral.rs, has AVX2 dot products for Q4_0, Q8_0 and the K-quants, but
//! none for Q4_1, Q5_0 and Q5_1: their matmuls run scalar and dominate both prompt and
//! decode time (SmolLM2 Q4_1 decoded at about 20 tokens/s on two cores, batching or not).
//! Re-encoding those tensors as Q8_0 on load moves them onto the SIMD kernel. Q8_0 uses the
//! same 32-value blocks with 8-bit levels, so the 16 levels of a 4- or 5-bit block survive
//! with an error far below the original quantization's; the cost is memory (8.5 instead of
//! 5 to 6 bits a weight). GPU builds never need this: candle's CUDA kernels cover every type.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

/// What the GGUF tensors are re-encoded as on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Tensors of scalar-only types become Q8_0; the rest stay as they are.
    Q8_0,
    /// Every quantized tensor becomes f32, so matmuls run on candle's blocked f32 GEMM,
    /// which reads the weights once per batch instead of once per sequence: the fastest for
    /// many concurrent requests on a small model, at 4 bytes a weight.
    F32,
}

impl Target {
    fn converts(self, dtype: GgmlDType) -> bool {
        match self {
            Target::Q8_0 => scalar_on_cpu(dtype),
            Target::F32 => dtype != GgmlDType::F32,
        }
    }

    fn dtype(self) -> GgmlDType {
        match self {
            Target::Q8_0 => GgmlDType::Q8_0,
            Target::F32 => GgmlDType::F32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error("re-encoding tensor {tensor} of {path}: {source}")]
    Encode {
        path: PathBuf,
        tensor: String,
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error("writing {path} (is --scratch-dir writable, with room for the model?): {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: Box<candle_core::Error>,
    },
}

/// Whether candle runs matmuls of this type on scalar code on the CPU.
pub fn scalar_on_cpu(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// The outcome of [`transcode`] for one file.
#[derive(Debug, PartialEq, Eq)]
pub struct Transcoded {
    /// The file to load: the original when nothing needed re-encoding.
    pub path: PathBuf,
    pub reencoded: usize,
    pub tensors: usize,
}

/// Writes a copy of the GGUF file at `src` into `out_dir` with the tensors `target`
/// converts re-encoded, metadata unchanged. A file with no such tensor is not copied.
pub fn transcode(src: &Path, out_dir: &Path, target: Target) -> Result<Transcoded, Error> {
    let read_err = |source: candle_core::Error| Error::Read {
        path: src.to_owned(),
        source: Box::new(source),
    };
    let mut reader = BufReader::new(File::open(src).map_err(|e| read_err(e.into()))?);
    let content = gguf_file::Content::read(&mut reader).map_err(read_err)?;
    let tensors = content.tensor_infos.len();
    let reencoded = content
        .tensor_infos
        .values()
        .filter(|info| target.converts(info.ggml_dtype))
        .count();
    if reencoded == 0 {
        return Ok(Transcoded {
            path: src.to_owned(),
            reencoded,
            tensors,
        });
    }

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(read_err)?;
        let tensor = if target.converts(tensor.dtype()) {
            tensor
                .dequantize(&Device::Cpu)
                .and_then(|weights| QTensor::quantize(&weights, target.dtype()))
                .map_err(|source| Error::Encode {
                    path: src.to_owned(),
                    tensor: name.clone(),
                    source: Box::new(source),
                })?
        } else {
            tensor
        };
        out.push((name.as_str(), tensor));
    }
    // candle's writer aligns tensor data to 32 bytes, the GGUF default; an alignment key
    // carried over from the source could say otherwise and misplace every tensor.
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(key, _)| key.as_str() != "general.alignment")
        .map(|(key, value)| (key.as_str(), value))
        .collect();
    metadata.sort_by_key(|(key, _)| *key);

    let path = out_dir.join(src.file_name().unwrap_or("model.gguf".as_ref()));
    let write_err = |source: candle_core::Error| Error::Write {
        path: path.clone(),
        source: Box::new(source),
    };
    std::fs::create_dir_all(out_dir).map_err(|e| write_err(e.into()))?;
    let mut writer = BufWriter::new(File::create(&path).map_err(|e| write_err(e.into()))?);
    let tensors_out: Vec<(&str, &QTensor)> = out.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut writer, &metadata, &tensors_out).map_err(write_err)?;
    writer
        .into_inner()
        .map_err(|e| write_err(e.into_error().into()))?
        .sync_all()
        .map_err(|e| write_err(e.into()))?;
    Ok(Transcoded {
        path,
        reencoded,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;

    fn write_gguf(path: &Path, tensors: &[(&str, &QTensor)]) {
        let arch = gguf_file::Value::String("llama".into());
        let alignment = gguf_file::Value::U32(32);
        let mut file = File::create(path).unwrap();
        gguf_file::write(
            &mut file,
            &[
                ("general.architecture", &arch),
                ("general.alignment", &alignment),
            ],
            tensors,
        )
        .unwrap();
    }

    fn read(path: &Path) -> (gguf_file::Content, BufReader<File>) {
        let mut reader = BufReader::new(File::open(path).unwrap());
        (gguf_file::Content::read(&mut reader).unwrap(), reader)
    }

    #[test]
    fn scalar_only_tensors_become_q8_0_and_keep_their_values() {
        let dir = std::env::temp_dir().join(format!("requant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values: Vec<f32> = (0..64 * 32)
            .map(|i| ((i % 97) as f32 - 48.0) / 10.0)
            .collect();
        let weights = Tensor::from_vec(values, (64, 32), &Device::Cpu).unwrap();
        let q4_1 = QTensor::quantize(&weights, GgmlDType::Q4_1).unwrap();
        let q4_0 = QTensor::quantize(&weights, GgmlDType::Q4_0).unwrap();
        let src = dir.join("model.gguf");
        write_gguf(&src, &[("a.weight", &q4_1), ("b.weight", &q4_0)]);

        let as_f32 = transcode(&src, &dir.join("f32"), Target::F32).unwrap();
        assert_eq!((as_f32.reencoded, as_f32.tensors), (2, 2));
        let (content, _) = read(&as_f32.path);
        assert!(
            content
                .tensor_infos
                .values()
                .all(|t| t.ggml_dtype == GgmlDType::F32)
        );

        let done = transcode(&src, &dir.join("out"), Target::Q8_0).unwrap();
        assert_eq!((done.reencoded, done.tensors), (1, 2));
        assert_eq!(done.path, dir.join("out/model.gguf"));

        let (content, mut reader) = read(&done.path);
        assert_eq!(
            content.metadata["general.architecture"]
                .to_string()
                .unwrap(),
            "llama"
        );
        let a = content
            .tensor(&mut reader, "a.weight", &Device::Cpu)
            .unwrap();
        let b = content
            .tensor(&mut reader, "b.weight", &Device::Cpu)
            .unwrap();
        assert_eq!((a.dtype(), b.dtype()), (GgmlDType::Q8_0, GgmlDType::Q4_0));
        assert_eq!(a.shape().dims(), [64, 32]);
        // Q8_0 holds each Q4_1 level to within half an 8-bit step of its block's range.
        let before = q4_1.dequantize(&Device::Cpu).unwrap();
        let after = a.dequantize(&Device::Cpu).unwrap();
        let worst = (before - after)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(worst < 4.8 / 127.0, "worst error {worst}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_without_scalar_only_tensors_is_used_as_it_is() {
        let dir = std::env::temp_dir().join(format!("requant-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let weights = Tensor::zeros((8, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&weights, GgmlDType::Q8_0).unwrap();
        let src = dir.join("model.gguf");
        write_gguf(&src, &[("w", &q8)]);
        let done = transcode(&src, &dir.join("out"), Target::Q8_0).unwrap();
        assert_eq!(
            done,
            Transcoded {
                path: src,
                reencoded: 0,
                tensors: 1
            }
        );
        assert!(!dir.join("out").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
