//! `--device` and `--dtype` parsing, and picking the best available device for `auto`.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// Parse a device specification: `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
///
/// `auto` picks CUDA, then Metal, when whet was built with that feature and a device is present,
/// and the CPU otherwise.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    match spec {
        "auto" => {
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
        "cpu" => Ok(Device::Cpu),
        "metal" => {
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
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    Error::Device(format!(
                        "device `{s}`: `{n}` is not a GPU number; hint: use `cuda` or `cuda:0`"
                    ))
                })?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Device(format!(
                    "device `{s}`: this whet was built without CUDA support; hint: build it with `scripts/build-cuda.sh` or `cargo build --release --features cuda`"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| {
                Error::Device(format!(
                    "device `{s}`: CUDA support is compiled in but no usable GPU was found ({}); hint: check the NVIDIA driver with `nvidia-smi`, or use `--device cpu`",
                    crate::error::one_line(e)
                ))
            })
        }
        other => Err(Error::Device(format!(
            "unknown device `{other}`; expected one of `auto`, `cpu`, `cuda`, `cuda:N`, `metal`"
        ))),
    }
}

/// Parse a weight dtype: `f32`, `f16` or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => {
            Err(Error::Device(format!("unknown dtype `{other}`; expected `f32`, `f16` or `bf16`")))
        }
    }
}

/// Parse an inference quantization: `q8_0` (about 1% logit error, 3.8x smaller than f32) or
/// `q4_0` (4-bit, smaller still, visibly less faithful).
pub fn parse_quantization(spec: &str) -> Result<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType;
    match spec.trim().to_ascii_lowercase().as_str() {
        "q8_0" => Ok(GgmlDType::Q8_0),
        "q4_0" => Ok(GgmlDType::Q4_0),
        other => {
            Err(Error::Device(format!("unknown quantization `{other}`; expected `q8_0` or `q4_0`")))
        }
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
