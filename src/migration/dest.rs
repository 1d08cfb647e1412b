//! The destination (`listen`) side of a migration: what each client connection is to it
//! (`Role`), when a sender's goodbye completes the handover, and the resume token (`Lineage`).
//! Pure bookkeeping: the client session calls one method per event and does the I/O itself.
//!
//! | role       | event                                  | next                              |
//! |------------|----------------------------------------|-----------------------------------|
//! | (hello)    | newstyle                               | Plain                             |
//! | (hello)    | oldstyle on a listen server            | Oldstyle { durable: no, wrote: no } |
//! | Plain      | FlexnbdSender(id)                      | Declared { id }                   |
//! | Declared   | FlexnbdSender(id)                      | Declared { id }                   |
//! | Plain      | FlexnbdMigrate (listen)                | Sender { None, durable: no }      |
//! | Declared   | FlexnbdMigrate (listen)                | Sender { Some(id), durable: no }  |
//! | Sender     | FlexnbdSender(id) / FlexnbdMigrate     | Sender, id replaced / unchanged   |
//! | Sender, Oldstyle | write-type request with FUA      | durable unchanged                 |
//! | Sender, Oldstyle | write-type request without FUA   | durable: no (Oldstyle: wrote)     |
//! | Sender, Oldstyle | write-type request failed        | durable: no                       |
//! | Sender, Oldstyle | FLUSH completed                  | durable: yes                      |
//!
//! The handover completes when a sender says goodbye (DISC) with everything it wrote durable,
//! or, for an original flexnbd (oldstyle, which cannot declare itself), once it wrote anything.

use crate::proto::SENDER_FEATURE_FUA_HANDOVER;

/// Feature bits this server's ACK to `FlexnbdSender` carries (see `SENDER_FEATURE_*`).
pub const SENDER_FEATURES: u64 = SENDER_FEATURE_FUA_HANDOVER;

/// The data of a `listen` server's ACK to `FlexnbdSender`. Sources before the feature bits
/// ignore it: they look only at the replies to `FlexnbdMigrate` and `Go`.
pub fn sender_ack() -> [u8; 8] {
    SENDER_FEATURES.to_be_bytes()
}

/// What a client connection is to a migration coming in. "Durable" means: a FLUSH completed,
/// and every write-type request accepted since carried FUA and succeeded (a FUA write is on
/// stable storage when it is answered). It starts false: a sender that never flushed has
/// completed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A client like any other.
    Plain,
    /// Said which migration it is (`FlexnbdSender`) without declaring itself a sender (yet).
    /// On a `serve` that is all a sender can do; the reactor checks it is not our own mirror.
    Declared { sender: u64 },
    /// Declared itself a migration sender (`FlexnbdMigrate`, listen only); `sender` is the
    /// migration it said it is, if it said.
    Sender { sender: Option<u64>, durable: bool },
    /// An original flexnbd's sender on an oldstyle listen server: it cannot declare itself, so
    /// every client is taken for one; it completes once it wrote anything and said goodbye.
    Oldstyle { durable: bool, wrote: bool },
}

/// What `Role::migrate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrate {
    /// The connection was not a sender before: it now counts in `Lineage::sender_joined`.
    pub joined: bool,
    /// Who it said it is, for `Lineage::sender`.
    pub sender: Option<u64>,
}

impl Role {
    /// A new connection; `oldstyle_listen`: it is on an oldstyle `listen` server.
    pub fn new(oldstyle_listen: bool) -> Role {
        if oldstyle_listen { Role::Oldstyle { durable: false, wrote: false } } else { Role::Plain }
    }

    /// `FlexnbdSender`: the connection says which migration it is.
    pub fn declare(&mut self, id: u64) {
        match self {
            Role::Plain | Role::Declared { .. } => *self = Role::Declared { sender: id },
            Role::Sender { sender, .. } => *sender = Some(id),
            // Oldstyle has no options.
            Role::Oldstyle { .. } => {}
        }
    }

    /// `FlexnbdMigrate` on a listen server: the connection declares itself a sender.
    pub fn migrate(&mut self) -> Migrate {
        let sender = match *self {
            Role::Plain => None,
            Role::Declared { sender } => Some(sender),
            // Repeated: it must not count twice.
            Role::Sender { sender, .. } => return Migrate { joined: false, sender },
            Role::Oldstyle { .. } => return Migrate { joined: false, sender: None },
        };
        *self = Role::Sender { sender, durable: false };
        Migrate { joined: true, sender }
    }

    /// A write-type request (WRITE, TRIM, WRITE_ZEROES) was accepted.
    pub fn note_write(&mut self, fua: bool) {
        match self {
            Role::Plain | Role::Declared { .. } => {}
            Role::Sender { durable, .. } => *durable &= fua,
            Role::Oldstyle { durable, wrote } => {
                *durable &= fua;
                *wrote = true;
            }
        }
    }

    /// A write-type request failed: what it should have written is not there.
    pub fn write_failed(&mut self) {
        if let Role::Sender { durable, .. } | Role::Oldstyle { durable, .. } = self {
            *durable = false;
        }
    }

    /// A FLUSH completed: everything answered before it is on stable storage.
    pub fn flushed(&mut self) {
        if let Role::Sender { durable, .. } | Role::Oldstyle { durable, .. } = self {
            *durable = true;
        }
    }

    /// Whether the connection is a migration sender (declared, or oldstyle on a listen server).
    pub fn is_sender(&self) -> bool {
        matches!(self, Role::Sender { .. } | Role::Oldstyle { .. })
    }

    /// The migration the connection said it is, whether or not it declared itself a sender.
    pub fn declared_sender(&self) -> Option<u64> {
        match *self {
            Role::Declared { sender } => Some(sender),
            Role::Sender { sender, .. } => sender,
            Role::Plain | Role::Oldstyle { .. } => None,
        }
    }

    /// Whether the connection's clean goodbye (DISC, everything answered) completes the
    /// migration: it is a sender and everything it wrote is durable, or it is an original
    /// oldstyle sender that wrote.
    pub fn completes_on_disc(&self) -> bool {
        match *self {
            Role::Plain | Role::Declared { .. } => false,
            Role::Sender { durable, .. } => durable,
            Role::Oldstyle { durable, wrote } => durable || wrote,
        }
    }
}

/// A `listen` server's token for "your copy here is as you left it". A migration sender whose
/// attempt was cut resumes from its last checkpoint only when it is given the same token again;
/// any other token makes it copy everything. So the token moves on whenever the file may hold
/// something that sender did not write: another sender declared itself (two sources pointed at
/// one destination), a sender did not say who it is, or a plain client wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    token: u64,
    sender: Option<u64>,
    /// Declared senders still connected: while there is one, only senders may change the file.
    open_senders: usize,
}

impl Lineage {
    /// `seed` is random per process, so another process never hands out a token seen here.
    pub fn new(seed: u64) -> Lineage {
        Lineage { token: seed, sender: None, open_senders: 0 }
    }

    /// Whether a migration attempt is connected. A plain client's write now would land in the
    /// middle of the incoming copy, or after the last pass over its range; between attempts it
    /// only makes the next attempt copy everything (`foreign_write`).
    pub fn migrating(&self) -> bool {
        self.open_senders > 0
    }

    /// A connection declared itself a sender (once per connection).
    pub fn sender_joined(&mut self) {
        self.open_senders += 1;
    }

    /// A sender's connection closed. Oldstyle senders never declare themselves, so they never
    /// joined: the count saturates at zero rather than tracking them.
    pub fn sender_left(&mut self) {
        self.open_senders = self.open_senders.saturating_sub(1);
    }

    /// A migration sender declared itself (`id` is None if it did not say who it is); returns
    /// the token to give it.
    pub fn sender(&mut self, id: Option<u64>) -> u64 {
        if id.is_none() || id != self.sender {
            self.token = self.token.wrapping_add(1);
        }
        self.sender = id;
        self.token
    }

    /// Someone other than a migration sender changed the file.
    pub fn foreign_write(&mut self) {
        self.token = self.token.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> Role {
        let mut r = Role::new(false);
        r.declare(7);
        r.migrate();
        r
    }

    #[test]
    fn a_new_connection_is_plain_except_on_an_oldstyle_listen_server() {
        assert_eq!(Role::new(false), Role::Plain);
        assert_eq!(Role::new(true), Role::Oldstyle { durable: false, wrote: false });
        assert!(!Role::new(false).is_sender());
        assert!(Role::new(true).is_sender());
    }

    #[test]
    fn declaring_says_who_it_is_without_making_a_sender() {
        let mut r = Role::Plain;
        r.declare(5);
        assert_eq!(r, Role::Declared { sender: 5 });
        assert!(!r.is_sender());
        assert_eq!(r.declared_sender(), Some(5));
        r.declare(6);
        assert_eq!(r.declared_sender(), Some(6), "the last declaration counts");
        r.note_write(false);
        r.flushed();
        assert_eq!(r, Role::Declared { sender: 6 }, "a declared non-sender keeps no durability");
        assert!(!r.completes_on_disc());
    }

    #[test]
    fn migrating_joins_once_and_keeps_the_declared_id() {
        let mut r = Role::Plain;
        r.declare(9);
        assert_eq!(r.migrate(), Migrate { joined: true, sender: Some(9) });
        assert_eq!(r, Role::Sender { sender: Some(9), durable: false });
        assert_eq!(r.migrate(), Migrate { joined: false, sender: Some(9) }, "a repeat counts once");
        r.declare(10);
        assert_eq!(r.declared_sender(), Some(10), "a later id replaces the earlier");
        assert!(r.is_sender());

        let mut anon = Role::Plain;
        assert_eq!(anon.migrate(), Migrate { joined: true, sender: None });
        assert_eq!(anon.declared_sender(), None);
    }

    #[test]
    fn an_oldstyle_sender_neither_declares_nor_joins() {
        let mut r = Role::new(true);
        r.declare(3);
        assert_eq!(r.declared_sender(), None);
        assert_eq!(r.migrate(), Migrate { joined: false, sender: None });
        assert_eq!(r, Role::Oldstyle { durable: false, wrote: false });
    }

    #[test]
    fn plain_clients_never_complete() {
        let mut r = Role::Plain;
        r.note_write(true);
        r.flushed();
        assert_eq!(r, Role::Plain);
        assert!(!r.completes_on_disc());
    }

    #[test]
    fn a_sender_completes_only_once_a_flush_made_everything_durable() {
        let mut r = sender();
        assert!(!r.completes_on_disc(), "nothing flushed yet");
        r.note_write(false);
        assert!(!r.completes_on_disc());
        r.flushed();
        assert!(r.completes_on_disc(), "flushed after its writes");
    }

    #[test]
    fn a_fua_write_after_a_flush_stays_durable() {
        let mut r = sender();
        r.note_write(false);
        r.flushed();
        r.note_write(true);
        r.note_write(true);
        assert!(r.completes_on_disc(), "the final pass with FUA needs no second FLUSH");
    }

    #[test]
    fn a_plain_write_after_a_flush_is_not_durable() {
        let mut r = sender();
        r.flushed();
        r.note_write(true);
        r.note_write(false);
        assert!(!r.completes_on_disc());
        r.note_write(true);
        assert!(!r.completes_on_disc(), "a FUA write does not make earlier ones durable");
        r.flushed();
        assert!(r.completes_on_disc());
    }

    #[test]
    fn fua_writes_alone_are_not_enough_without_a_flush() {
        let mut r = sender();
        r.note_write(true);
        assert!(!r.completes_on_disc(), "the earlier passes need a FLUSH");
    }

    #[test]
    fn a_failed_write_undoes_durability_until_the_next_flush() {
        let mut r = sender();
        r.flushed();
        r.note_write(true);
        r.write_failed();
        assert!(!r.completes_on_disc());
        r.flushed();
        assert!(r.completes_on_disc());
    }

    #[test]
    fn an_oldstyle_sender_completes_once_it_wrote_or_flushed() {
        let r = Role::new(true);
        assert!(!r.completes_on_disc(), "a reader saying goodbye completes nothing");
        let mut w = Role::new(true);
        w.note_write(false);
        assert_eq!(w, Role::Oldstyle { durable: false, wrote: true });
        assert!(w.completes_on_disc(), "the original sender never flushes");
        let mut f = Role::new(true);
        f.flushed();
        assert!(f.completes_on_disc());
        f.note_write(true);
        assert_eq!(f, Role::Oldstyle { durable: true, wrote: true });
        f.write_failed();
        assert!(f.completes_on_disc(), "as before: an original sender that wrote completes");
    }

    #[test]
    fn the_sender_ack_carries_the_fua_handover_bit() {
        let ack = sender_ack();
        assert_eq!(u64::from_be_bytes(ack) & SENDER_FEATURE_FUA_HANDOVER, 1);
        assert_eq!(ack[7] & 1, 1, "bit 0 is the last byte's lowest bit, big-endian");
    }

    #[test]
    fn a_sender_keeps_its_token_until_someone_else_writes() {
        let mut l = Lineage::new(100);
        let a = l.sender(Some(7));
        assert_eq!(l.sender(Some(7)), a, "the same sender coming back resumes");
        let b = l.sender(Some(8));
        assert_ne!(b, a, "another sender");
        assert_ne!(l.sender(Some(7)), a, "the first sender after another one wrote");
        let c = l.sender(Some(7));
        l.foreign_write();
        assert_ne!(l.sender(Some(7)), c, "after a plain client wrote");
        let d = l.sender(None);
        assert_ne!(l.sender(None), d, "a sender that does not say who it is never resumes");
    }

    #[test]
    fn plain_writes_are_refused_only_while_a_sender_is_connected() {
        let mut l = Lineage::new(5);
        assert!(!l.migrating());
        l.sender(Some(1));
        assert!(!l.migrating(), "a token alone does not count as a connection");
        l.sender_joined();
        l.sender_joined();
        assert!(l.migrating());
        l.sender_left();
        assert!(l.migrating(), "the newer connection is still there");
        l.sender_left();
        assert!(!l.migrating());
        l.sender_left();
        assert!(!l.migrating());
    }
}
