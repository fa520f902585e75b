//! Interface facts the datapath needs (index, MAC), read in the calling thread's network
//! namespace.

use std::ffi::CString;

use crate::{preflight, MeshError};

/// The interface's index and hardware address.
pub fn resolve(name: &str) -> Result<(u32, [u8; 6]), MeshError> {
    let ifindex = preflight::ifindex(name)?;
    Ok((ifindex, mac(name)?))
}

/// The interface's MAC (SIOCGIFHWADDR).
pub fn mac(name: &str) -> Result<[u8; 6], MeshError> {
    let io = |what: &str| MeshError::Io {
        what: format!("{what} of interface {name:?}"),
        source: std::io::Error::last_os_error(),
    };
    let c = CString::new(name).map_err(|_| MeshError::NoSuchInterface { name: name.into() })?;
    if c.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(MeshError::NoSuchInterface { name: name.into() });
    }
    // SAFETY: a socket for the ioctl, closed below; ifreq is zeroed and the name fits.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io("socket for the MAC"));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(c.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR as _, &mut ifr);
        let err = (rc < 0).then(|| io("reading the MAC"));
        libc::close(fd);
        if let Some(e) = err {
            return Err(e);
        }
        let sa = ifr.ifr_ifru.ifru_hwaddr.sa_data;
        Ok([
            sa[0] as u8,
            sa[1] as u8,
            sa[2] as u8,
            sa[3] as u8,
            sa[4] as u8,
            sa[5] as u8,
        ])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_has_a_zero_mac_and_a_missing_interface_is_named() {
        assert_eq!(super::mac("lo").unwrap(), [0; 6]);
        let e = super::resolve("mesh-nope1").unwrap_err().to_string();
        assert!(e.contains("\"mesh-nope1\" does not exist"), "{e}");
    }
}
