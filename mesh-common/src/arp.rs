//! ARP answers for service VIPs on Docker's overlay. Without IPVS in the task, a task's
//! packet to a VIP leaves through its overlay interface, which first asks who has the
//! VIP; nobody does, so the mesh answers (with [`vip_mac`]) and then rewrites the
//! packets that follow. Pure, over the bytes of one Ethernet frame.

/// Ethernet header + ARP for IPv4 over Ethernet.
pub const FRAME_LEN: usize = 42;
pub const ETH_P_ARP: u16 = 0x0806;
const OP_REQUEST: u16 = 1;
const OP_REPLY: u16 = 2;

/// The MAC the mesh answers for a VIP: Docker's convention for an overlay address
/// (02:42 + the address), which no task holds because IPAM gave the address to the VIP.
#[inline(always)]
pub const fn vip_mac(vip: u32) -> [u8; 6] {
    crate::lb::docker_mac(vip)
}

/// The address an ARP request in `frame` (untagged Ethernet) asks for, as on the wire;
/// `None` for anything else: a reply, another hardware or protocol type, a gratuitous
/// announcement (sender == target).
#[inline(always)]
pub fn request_target(frame: &[u8; FRAME_LEN]) -> Option<u32> {
    let be16 = |i: usize| u16::from_be_bytes([frame[i], frame[i + 1]]);
    let ok = be16(12) == ETH_P_ARP
        && be16(14) == 1 // Ethernet
        && be16(16) == 0x0800
        && frame[18] == 6
        && frame[19] == 4
        && be16(20) == OP_REQUEST;
    let sender = [frame[28], frame[29], frame[30], frame[31]];
    let target = [frame[38], frame[39], frame[40], frame[41]];
    (ok && sender != target).then_some(u32::from_ne_bytes(target))
}

/// Turns the request in `frame` into the reply "`target` is at `mac`", addressed to
/// the asker.
#[inline(always)]
pub fn answer(frame: &mut [u8; FRAME_LEN], mac: [u8; 6]) {
    let mut asker_mac = [0u8; 6];
    asker_mac.copy_from_slice(&frame[22..28]);
    let mut asker_ip = [0u8; 4];
    asker_ip.copy_from_slice(&frame[28..32]);
    let mut target_ip = [0u8; 4];
    target_ip.copy_from_slice(&frame[38..42]);
    frame[0..6].copy_from_slice(&asker_mac);
    frame[6..12].copy_from_slice(&mac);
    frame[20..22].copy_from_slice(&OP_REPLY.to_be_bytes());
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&target_ip);
    frame[32..38].copy_from_slice(&asker_mac);
    frame[38..42].copy_from_slice(&asker_ip);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(sender: [u8; 4], target: [u8; 4]) -> [u8; FRAME_LEN] {
        let mut f = [0u8; FRAME_LEN];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[2, 0x42, 10, 0, 1, 8]);
        f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&[2, 0x42, 10, 0, 1, 8]);
        f[28..32].copy_from_slice(&sender);
        f[38..42].copy_from_slice(&target);
        f
    }

    #[test]
    fn a_request_is_answered_to_the_asker() {
        let mut f = request([10, 0, 1, 8], [10, 0, 1, 2]);
        let vip = request_target(&f).unwrap();
        assert_eq!(vip, u32::from_ne_bytes([10, 0, 1, 2]));
        answer(&mut f, vip_mac(vip));
        let mac = [2, 0x42, 10, 0, 1, 2];
        assert_eq!(&f[0..6], &[2, 0x42, 10, 0, 1, 8], "to the asker");
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[20..22], &[0, 2], "a reply");
        assert_eq!(&f[22..28], &mac, "sender hardware: the VIP's");
        assert_eq!(&f[28..32], &[10, 0, 1, 2], "sender protocol: the VIP");
        assert_eq!(&f[32..38], &[2, 0x42, 10, 0, 1, 8]);
        assert_eq!(&f[38..42], &[10, 0, 1, 8]);
        assert_eq!(request_target(&f), None, "a reply is not a request");
    }

    #[test]
    fn other_frames_are_not_requests() {
        let f = request([10, 0, 1, 2], [10, 0, 1, 2]);
        assert_eq!(request_target(&f), None, "gratuitous");
        let mut f = request([10, 0, 1, 8], [10, 0, 1, 2]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(request_target(&f), None, "IPv4");
        let mut f = request([10, 0, 1, 8], [10, 0, 1, 2]);
        f[16..18].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(request_target(&f), None, "not IPv4 addresses");
    }
}
