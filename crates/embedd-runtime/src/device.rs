//! The compute device a model runs on, as named on the command line: `cpu`, `cuda` or `cuda:N`.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::RuntimeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': expected cpu, cuda or cuda:N")),
        }
    }
}

/// The number format a model computes in, as named on the command line (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Float32 throughout: exact parity with float32 references.
    #[default]
    F32,
    /// Dense layers and attention products in bfloat16 with float32 sums (CPUs with AVX-512
    /// BF16); softmax and LayerNorm stay float32. On a GPU: weights stored in bfloat16.
    Bf16,
    /// Weights stored and computed in float16 (GPUs).
    F16,
    /// CPUs with AVX-512 VNNI: dense layers on 8-bit weights (one scale per output column)
    /// and 8-bit inputs (one scale per row), int32 sums; attention, softmax and the norms stay
    /// float32.
    Int8,
}

impl Precision {
    /// The dtype candle stores the weights in when the graph runs this precision.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
            // Quantized from float32 weights at load.
            Self::Int8 => candle_core::DType::F32,
        }
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "int8" | "i8" => Ok(Self::Int8),
            _ => Err(format!(
                "unknown dtype '{s}': expected f32, bf16, f16 or int8"
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F32 => write!(f, "f32"),
            Self::Bf16 => write!(f, "bf16"),
            Self::F16 => write!(f, "f16"),
            Self::Int8 => write!(f, "int8"),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    pub fn open(self) -> Result<Device, RuntimeError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(RuntimeError::Device(format!(
                        "{self} requested but this build has no CUDA support (build with `--features cuda`)"
                    )));
                }
                #[cfg(feature = "cuda")]
                if !cuda_driver_present() {
                    return Err(RuntimeError::Device(format!(
                        "{self} requested but no NVIDIA driver (libcuda.so.1) was found: no GPU on this machine"
                    )));
                }
                Device::new_cuda(ordinal).map_err(|e| RuntimeError::Device(format!("{self}: {e}")))
            }
        }
    }
}

/// Whether the CUDA driver library can be opened. The CUDA build loads it at run time, and
/// candle's device constructor panics when it is missing; asking first turns that into an error.
#[cfg(feature = "cuda")]
fn cuda_driver_present() -> bool {
    [c"libcuda.so.1", c"libcuda.so"].iter().any(|name| {
        // SAFETY: dlopen is given a NUL-terminated name; a handle it returns is closed at once
        // (the driver stays loaded only if something else holds it).
        unsafe {
            let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            !handle.is_null() && libc::dlclose(handle) == 0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line_forms() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
