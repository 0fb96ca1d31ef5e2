//! Safetensors checkpoints read tensor by tensor with plain file reads.
//!
//! Every backbone copies its weights out of the checkpoint (into packed kernels' layouts or
//! candle's own storage), so a memory map bought nothing but resident pages: each tensor's
//! mapped pages stayed in the process's RSS until the whole map was dropped, and at the end of
//! a load the checkpoint was resident twice over (all-MiniLM-L6-v2: 87 MiB mapped beside its
//! 87 MiB of packed weights, a 209 MiB load peak for a server that then rests at 127). Reading
//! each tensor into a buffer of its own keeps at most one tensor's bytes beside the packed
//! weights; the file's pages stay in the page cache, outside the process.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

/// Header sizes over this are refused before they are read (safetensors' own bound).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Where one tensor lies: its file, its element type and shape, and its bytes' absolute range.
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// One or more safetensors files (a sharded checkpoint's shards) indexed by tensor name.
pub struct SafetensorsFiles {
    files: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
}

impl SafetensorsFiles {
    /// Reads every file's header; tensors are read when asked for.
    pub fn open(paths: &[PathBuf]) -> candle_core::Result<Self> {
        let mut entries = HashMap::new();
        for (file, path) in paths.iter().enumerate() {
            let header = read_header(path)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())).bt())?;
            for (name, info) in header.metadata.tensors() {
                let entry = entry(file, &header, info).map_err(|e| {
                    candle_core::Error::Msg(format!("{}: tensor {name}: {e}", path.display()))
                })?;
                entries.insert(name, entry);
            }
        }
        Ok(Self {
            files: paths.to_vec(),
            entries,
        })
    }

    /// The tensor `name` on `dev` as `dtype`.
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let path = &self.files[entry.file];
        let mut bytes = vec![0u8; entry.len];
        File::open(path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(entry.start))?;
                f.read_exact(&mut bytes)
            })
            .map_err(|e| candle_core::Error::Msg(format!("{}: {name}: {e}", path.display())))?;
        Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }
}

struct Header {
    metadata: Metadata,
    /// Where the data section starts in the file.
    data_start: u64,
    /// The data section's length.
    data_len: u64,
}

fn read_header(path: &Path) -> Result<Header, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| format!("no safetensors header: {e}"))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(format!(
            "safetensors header of {header_len} bytes in a file of {file_len}"
        ));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(|e| e.to_string())?;
    let metadata: Metadata =
        serde_json::from_slice(&json).map_err(|e| format!("bad safetensors header: {e}"))?;
    Ok(Header {
        metadata,
        data_start: 8 + header_len,
        data_len: file_len - 8 - header_len,
    })
}

fn entry(file: usize, header: &Header, info: &TensorInfo) -> Result<Entry, String> {
    let dtype = candle_dtype(info.dtype)?;
    let (start, end) = info.data_offsets;
    let elements: usize = info.shape.iter().product();
    let expected = elements
        .checked_mul(dtype.size_in_bytes())
        .ok_or("shape overflows")?;
    if end < start || end - start != expected || end as u64 > header.data_len {
        return Err(format!(
            "bytes {start}..{end} do not hold {:?} {:?} in a data section of {}",
            info.dtype, info.shape, header.data_len
        ));
    }
    Ok(Entry {
        file,
        dtype,
        shape: info.shape.clone(),
        start: header.data_start + start as u64,
        len: expected,
    })
}

fn candle_dtype(dtype: Dtype) -> Result<DType, String> {
    Ok(match dtype {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8_E4M3 => DType::F8E4M3,
        other => return Err(format!("unsupported element type {other:?}")),
    })
}

impl SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_read_back_as_saved_across_shards() {
        let dir = std::env::temp_dir().join(format!("embedd-safetensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let (one, two) = (dir.join("1.safetensors"), dir.join("2.safetensors"));
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a.clone())]), &one)
            .unwrap();
        candle_core::safetensors::save(&HashMap::from([("b.w".to_string(), b)]), &two).unwrap();
        let files = SafetensorsFiles::open(&[one, two.clone()]).unwrap();
        assert!(files.contains_tensor("a") && files.contains_tensor("b.w"));
        assert!(!files.contains_tensor("c"));
        let got = files
            .get(
                (3, 4).into(),
                "a",
                Default::default(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let widened = files
            .get_unchecked("b.w", DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(widened.to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
        let wrong = files.get(
            (2, 6).into(),
            "a",
            Default::default(),
            DType::F32,
            &Device::Cpu,
        );
        assert!(wrong.unwrap_err().to_string().contains("shape mismatch"));
        assert!(files.get_unchecked("c", DType::F32, &Device::Cpu).is_err());

        // A header that promises more bytes than the file holds is refused at open.
        let mut bytes = std::fs::read(&two).unwrap();
        bytes.truncate(bytes.len() - 2);
        std::fs::write(&two, bytes).unwrap();
        let err = SafetensorsFiles::open(&[two]).err().unwrap().to_string();
        assert!(err.contains("do not hold"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
