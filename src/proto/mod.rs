//! NBD wire constants (from NetworkBlockDevice/nbd doc/proto.md) and the pure codecs built on them.
//! Nothing in `proto` does I/O: the reactor, the CLI clients and the fuzzers all share it.

pub mod handshake;
pub mod transmission;

/// "NBDMAGIC": first 8 bytes of every greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle greeting marker and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Oldstyle greeting marker (the original flexnbd's hello).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Request and reply magics once NBD_OPT_EXTENDED_HEADERS is agreed (32-byte headers both ways).
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Length of the oldstyle hello: magic, magic, size, flags, 124 zero bytes.
pub const OLDSTYLE_HELLO_LEN: usize = 152;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: the length is a payload that follows the header, not an effect length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
/// Block status with 64-bit extent lengths; extended headers only.
pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
pub const CHUNK_ERROR: u16 = 32769;
pub const CHUNK_ERROR_OFFSET: u16 = 32770;

// base:allocation state bits.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The only metadata context we serve.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Context id we hand out for base:allocation.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Largest request payload we accept (and advertise as the maximum block size).
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest string (export name, context query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload we accept; real options (names, context queries) are far smaller.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident : $repr:ty { $($(#[$vm:meta])* $variant:ident = $val:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr($repr)]
        pub enum $name { $($(#[$vm])* $variant = $val),* }

        impl TryFrom<$repr> for $name {
            type Error = $repr;
            fn try_from(v: $repr) -> Result<Self, $repr> {
                match v {
                    $($val => Ok(Self::$variant),)*
                    other => Err(other),
                }
            }
        }
    };
}

wire_enum!(
    /// NBD_OPT_* option codes we know by name.
    OptCode: u32 {
        ExportName = 1,
        Abort = 2,
        List = 3,
        PeekExport = 4,
        StartTls = 5,
        Info = 6,
        Go = 7,
        StructuredReply = 8,
        ListMetaContext = 9,
        SetMetaContext = 10,
        ExtendedHeaders = 11,
        /// flexnbd-specific: the client declares itself a migration sender (see DESIGN §6).
        FlexnbdMigrate = 0x4658_0001,
        /// flexnbd-specific, sent just before FlexnbdMigrate: 8 bytes naming the migration (the
        /// same for each of its attempts). A separate option so that older destinations, which
        /// take FlexnbdMigrate only without data, still take it.
        FlexnbdSender = 0x4658_0002,
    }
);

/// Feature bit in a `listen` server's ACK to `FlexnbdSender` (8 bytes, a big-endian u64 of
/// feature bits): this server counts a FUA write as durable for the handover, so a source may
/// send its final pass with FUA and skip the final FLUSH (the handover then costs one round
/// trip). Sources that predate the bits ignore the ACK's data, and a source finding no data
/// (an older destination) assumes no bits, so this works both ways.
pub const SENDER_FEATURE_FUA_HANDOVER: u64 = 1 << 0;

wire_enum!(
    /// NBD_REP_* option reply types.
    RepType: u32 {
        Ack = 1,
        Server = 2,
        Info = 3,
        MetaContext = 4,
        ErrUnsup = 0x8000_0001,
        ErrPolicy = 0x8000_0002,
        ErrInvalid = 0x8000_0003,
        ErrPlatform = 0x8000_0004,
        ErrTlsReqd = 0x8000_0005,
        ErrUnknown = 0x8000_0006,
        ErrShutdown = 0x8000_0007,
        ErrBlockSizeReqd = 0x8000_0008,
        ErrTooBig = 0x8000_0009,
        ErrExtHeaderReqd = 0x8000_000a,
    }
);

/// NBD_REP_FLAG_ERROR: an option reply type with this bit set is an error, known to us or not.
pub const REP_FLAG_ERROR: u32 = 1 << 31;

wire_enum!(
    /// NBD_INFO_* information types inside NBD_REP_INFO.
    InfoType: u16 {
        Export = 0,
        Name = 1,
        Description = 2,
        BlockSize = 3,
    }
);

wire_enum!(
    /// NBD_CMD_* request types.
    Cmd: u16 {
        Read = 0,
        Write = 1,
        Disc = 2,
        Flush = 3,
        Trim = 4,
        Cache = 5,
        WriteZeroes = 6,
        BlockStatus = 7,
    }
);

wire_enum!(
    /// NBD error values carried in replies (errno numbering from the spec).
    NbdErr: u32 {
        Perm = 1,
        Io = 5,
        NoMem = 12,
        Inval = 22,
        NoSpc = 28,
        Overflow = 75,
        NotSup = 95,
        Shutdown = 108,
    }
);

#[inline]
pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
#[inline]
pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
#[inline]
pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl Cmd {
    /// The spec's name without its NBD_CMD_ prefix, for logs and status.
    pub fn name(self) -> &'static str {
        match self {
            Cmd::Read => "READ",
            Cmd::Write => "WRITE",
            Cmd::Disc => "DISC",
            Cmd::Flush => "FLUSH",
            Cmd::Trim => "TRIM",
            Cmd::Cache => "CACHE",
            Cmd::WriteZeroes => "WRITE_ZEROES",
            Cmd::BlockStatus => "BLOCK_STATUS",
        }
    }
}

/// The errno name of an NBD error value, for logs and status ("E?" plus the number when the
/// spec does not name it).
pub fn errno_name(e: u32) -> String {
    let name = match NbdErr::try_from(e) {
        Ok(NbdErr::Perm) => "EPERM",
        Ok(NbdErr::Io) => "EIO",
        Ok(NbdErr::NoMem) => "ENOMEM",
        Ok(NbdErr::Inval) => "EINVAL",
        Ok(NbdErr::NoSpc) => "ENOSPC",
        Ok(NbdErr::Overflow) => "EOVERFLOW",
        Ok(NbdErr::NotSup) => "ENOTSUP",
        Ok(NbdErr::Shutdown) => "ESHUTDOWN",
        Err(n) => return format!("E{n}"),
    };
    name.to_string()
}
