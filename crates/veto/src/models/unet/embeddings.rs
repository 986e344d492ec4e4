//! Sinusoidal timestep features (diffusers `Timesteps`), shared by the time embedding and
//! SDXL's `text_time` embedding; the MLP that embeds them is [`crate::models::layers::MlpEmbedder`].

use candle_core::{Device, Result, Tensor};

/// diffusers' `get_timestep_embedding` for a list of values, computed in f32 as torch does:
/// frequencies `exp(-ln(10000) j / (half - shift))`, features `[sin, cos]` (`[cos, sin]` with
/// `flip_sin_to_cos`), zero-padded to an odd `dim`. Returns `[values.len(), dim]` (f32).
pub fn sinusoidal(
    values: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let denom = half as f32 - freq_shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|j| {
            // torch: (-ln(max_period) * arange(f32)) / (half - shift), then exp
            let exponent = (-(10000f64.ln()) as f32 * j as f32) / denom;
            exponent.exp()
        })
        .collect();
    let mut data = Vec::with_capacity(values.len() * dim);
    for &v in values {
        let v = v as f32;
        let args: Vec<f32> = freqs.iter().map(|f| v * f).collect();
        let (first, second): (Vec<f32>, Vec<f32>) = if flip_sin_to_cos {
            (args.iter().map(|a| a.cos()).collect(), args.iter().map(|a| a.sin()).collect())
        } else {
            (args.iter().map(|a| a.sin()).collect(), args.iter().map(|a| a.cos()).collect())
        };
        data.extend(first);
        data.extend(second);
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (values.len(), dim), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_time_is_cos_one_sin_zero() {
        let e = sinusoidal(&[0.0], 6, true, 0.0, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(e[0], vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        let e = sinusoidal(&[0.0], 5, false, 1.0, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(e[0], vec![0.0, 0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn first_frequency_is_one() {
        let e = sinusoidal(&[2.0], 4, false, 0.0, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert!((e[0][0] - 2f32.sin()).abs() < 1e-7);
        // second frequency: exp(-ln(1e4) / 2) = 0.01
        assert!((e[0][1] - 0.02f32.sin()).abs() < 1e-7);
    }
}
