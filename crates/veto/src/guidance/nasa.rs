//! Negative-Away Steer Attention (NAG paper eq. 5): `Z = Z+ - phi Z-`, no normalisation.

use candle_core::{Result, Tensor};

/// NASA with `nasa_scale` = phi.
pub fn nasa(z_pos: &Tensor, z_neg: &Tensor, phi: f64) -> Result<Tensor> {
    z_pos - (z_neg * phi)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn subtracts_scaled_negative() {
        let zp = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let zn = Tensor::new(&[[4f32, -2.0]], &Device::Cpu).unwrap();
        let z = nasa(&zp, &zn, 0.5).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(z, vec![vec![-1.0, 3.0]]);
    }
}
