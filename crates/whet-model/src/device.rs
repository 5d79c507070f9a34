//! `--device`, `--dtype` and `--quantize` as typed values, and picking the best available device for `auto`.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// Where to run: `auto`, `cpu`, `cuda`, `cuda:N` or `metal` (the `--device` flag and the
/// `device` key of `train.toml`, written as the user writes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// CUDA, then Metal, when whet was built with that feature and a device is present; the
    /// CPU otherwise.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU `N` (`cuda` alone: `None`, GPU 0, or each rank's local GPU under `mpirun`).
    Cuda(Option<usize>),
    /// The Metal GPU.
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        match spec.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(None)),
            s => match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map(|n| Self::Cuda(Some(n))).map_err(|_| {
                    Error::Device(format!(
                        "device `{s}`: `{n}` is not a GPU number; hint: use `cuda` or `cuda:0`"
                    ))
                }),
                None => Err(Error::Device(format!(
                    "unknown device `{s}`; expected one of `auto`, `cpu`, `cuda`, `cuda:N`, `metal`"
                ))),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Metal => f.write_str("metal"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl DeviceSpec {
    /// Open the device; an unusable one is an error naming it, with a hint.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    match Device::new_cuda(0) {
                        Ok(d) => return Ok(d),
                        Err(e) => tracing::warn!(
                            "CUDA support is compiled in but no usable GPU was found ({}); using the CPU",
                            crate::error::one_line(e)
                        ),
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cpu => Ok(Device::Cpu),
            Self::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(Error::Device(
                        "device `metal`: this whet was built without Metal support; hint: rebuild with `cargo build --release --features metal` on macOS".into(),
                    ));
                }
                Device::new_metal(0).map_err(|e| {
                    Error::Device(format!(
                        "device `metal`: no usable Metal device: {}",
                        crate::error::one_line(e)
                    ))
                })
            }
            Self::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Device(format!(
                        "device `{self}`: this whet was built without CUDA support; hint: build it with `scripts/build-cuda.sh` or `cargo build --release --features cuda`"
                    )));
                }
                Device::new_cuda(ordinal.unwrap_or(0)).map_err(|e| {
                    Error::Device(format!(
                        "device `{self}`: CUDA support is compiled in but no usable GPU was found ({}); hint: check the NVIDIA driver with `nvidia-smi`, or use `--device cpu`",
                        crate::error::one_line(e)
                    ))
                })
            }
        }
    }
}

/// Parse and open a device specification (see [`DeviceSpec`]).
pub fn parse_device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>()?.open()
}

/// The dtype the base model's weights are held in (`--dtype`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    /// 32-bit float.
    #[default]
    #[value(alias = "float32")]
    F32,
    /// 16-bit float.
    #[value(alias = "float16")]
    F16,
    /// bfloat16.
    #[value(alias = "bfloat16")]
    Bf16,
}

impl WeightDType {
    /// candle's dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl std::fmt::Display for WeightDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Parse a weight dtype: `f32`, `f16` or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    <WeightDType as clap::ValueEnum>::from_str(spec.trim(), true).map(WeightDType::dtype).map_err(
        |_| {
            Error::Device(format!(
                "unknown dtype `{}`; expected `f32`, `f16` or `bf16`",
                spec.trim()
            ))
        },
    )
}

/// A block quantization of dense weights (`--quantize`, `--quantize-base`): `q8_0` (about 1%
/// logit error, 3.8x smaller than f32) or `q4_0` (4-bit, smaller still, visibly less faithful).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Quantization {
    /// 8-bit blocks of 32 with an f16 scale.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale.
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl Quantization {
    /// GGML's block type.
    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        match self {
            Self::Q8_0 => candle_core::quantized::GgmlDType::Q8_0,
            Self::Q4_0 => candle_core::quantized::GgmlDType::Q4_0,
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        })
    }
}

/// A short human name for a device (`cpu`, `cuda:0`, `metal`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_rejects_unknown() {
        assert!(parse_device("cpu").is_ok_and(|d| d.is_cpu()));
        assert!(parse_device("auto").is_ok());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("`tpu`"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("`x`") || err.contains("without CUDA"), "{err}");
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda").unwrap_err().to_string().contains("without CUDA support"));
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!(parse_dtype("bf16").ok(), Some(DType::BF16));
        assert!(parse_dtype("f8").unwrap_err().to_string().contains("`f8`"));
    }
}
