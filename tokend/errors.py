"""One error hierarchy for the whole daemon: every error that can cross the socket carries
its PKCS#11 return value, so the protocol layer needs no mapping table of its own and the
client rebuilds the same class from the code (unknown codes keep their number)."""

from __future__ import annotations

from typing import ClassVar

from tokend.pkcs11 import CKR


class TokendError(Exception):
    """Base of every tokend error. ``ckr`` is the PKCS#11 return value it stands for."""

    ckr: ClassVar[int] = CKR.CKR_GENERAL_ERROR
    _by_code: ClassVar[dict[int, type[TokendError]]] = {}

    def __init__(self, message: str = "", *, ckr: int | None = None) -> None:
        if ckr is not None:
            self.ckr = ckr  # type: ignore[misc]  # instance override for unknown codes
        super().__init__(message or self.ckr_name)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "ckr" in cls.__dict__:
            TokendError._by_code.setdefault(int(cls.ckr), cls)

    @property
    def ckr_name(self) -> str:
        try:
            return CKR(self.ckr).name
        except ValueError:
            return f"CKR_0x{self.ckr:08X}"

    @classmethod
    def from_ckr(cls, code: int, message: str = "", **extra: object) -> TokendError:
        """Rebuild the most specific error class for ``code`` (used by the client)."""
        klass = TokendError._by_code.get(int(code))
        if klass is None:
            return TokendError(message, ckr=int(code))
        err = klass.__new__(klass)
        TokendError.__init__(err, message)
        for key, value in extra.items():
            setattr(err, key, value)
        return err

    def data(self) -> dict[str, object]:
        """Extra machine-readable fields sent in the JSON-RPC error's ``data``."""
        return {}


def _define(name: str, code: CKR, doc: str) -> type[TokendError]:
    return type(name, (TokendError,), {"ckr": code, "__doc__": doc})


class PinIncorrectError(TokendError):
    """The PIN (or PUK) was wrong; ``retries`` tells how many tries are left (None: unknown)."""

    ckr = CKR.CKR_PIN_INCORRECT

    def __init__(self, message: str = "", *, retries: int | None = None) -> None:
        self.retries = retries
        if not message:
            message = "PIN incorrect" + (f", {retries} tries left" if retries is not None else "")
        super().__init__(message)

    def data(self) -> dict[str, object]:
        return {"retries": getattr(self, "retries", None)}


class PinLockedError(TokendError):
    """The PIN is blocked; unblock it with the PUK."""

    ckr = CKR.CKR_PIN_LOCKED

    def data(self) -> dict[str, object]:
        return {"retries": 0}


GeneralError = _define("GeneralError", CKR.CKR_GENERAL_ERROR, "Internal error.")
HostMemoryError = _define("HostMemoryError", CKR.CKR_HOST_MEMORY, "Daemon limit reached.")
SessionCountError = _define("SessionCountError", CKR.CKR_SESSION_COUNT, "Too many sessions.")
FunctionFailedError = _define("FunctionFailedError", CKR.CKR_FUNCTION_FAILED, "Failed.")
ArgumentsBadError = _define("ArgumentsBadError", CKR.CKR_ARGUMENTS_BAD, "Bad arguments.")
NoEventError = _define("NoEventError", CKR.CKR_NO_EVENT, "No slot event pending.")
SlotIdInvalidError = _define("SlotIdInvalidError", CKR.CKR_SLOT_ID_INVALID, "No such slot.")
AttributeTypeInvalidError = _define(
    "AttributeTypeInvalidError", CKR.CKR_ATTRIBUTE_TYPE_INVALID, "Unknown attribute."
)
AttributeValueInvalidError = _define(
    "AttributeValueInvalidError", CKR.CKR_ATTRIBUTE_VALUE_INVALID, "Bad attribute value."
)
AttributeSensitiveError = _define(
    "AttributeSensitiveError", CKR.CKR_ATTRIBUTE_SENSITIVE, "Attribute cannot be revealed."
)
DataInvalidError = _define("DataInvalidError", CKR.CKR_DATA_INVALID, "Input data invalid.")
DataLenRangeError = _define("DataLenRangeError", CKR.CKR_DATA_LEN_RANGE, "Input length wrong.")
DeviceError = _define("DeviceError", CKR.CKR_DEVICE_ERROR, "The token answered wrongly.")
DeviceMemoryError = _define("DeviceMemoryError", CKR.CKR_DEVICE_MEMORY, "Token memory full.")
DeviceRemovedError = _define("DeviceRemovedError", CKR.CKR_DEVICE_REMOVED, "The token was removed.")
EncryptedDataInvalidError = _define(
    "EncryptedDataInvalidError", CKR.CKR_ENCRYPTED_DATA_INVALID, "Decryption failed."
)
EncryptedDataLenRangeError = _define(
    "EncryptedDataLenRangeError", CKR.CKR_ENCRYPTED_DATA_LEN_RANGE, "Ciphertext length wrong."
)
FunctionNotSupportedError = _define(
    "FunctionNotSupportedError", CKR.CKR_FUNCTION_NOT_SUPPORTED, "Not supported."
)
FunctionCanceledError = _define("FunctionCanceledError", CKR.CKR_FUNCTION_CANCELED, "Cancelled.")
KeyHandleInvalidError = _define("KeyHandleInvalidError", CKR.CKR_KEY_HANDLE_INVALID, "No such key.")
KeyTypeInconsistentError = _define(
    "KeyTypeInconsistentError", CKR.CKR_KEY_TYPE_INCONSISTENT, "Key type does not fit."
)
KeyFunctionNotPermittedError = _define(
    "KeyFunctionNotPermittedError", CKR.CKR_KEY_FUNCTION_NOT_PERMITTED, "Key may not do that."
)
KeySizeRangeError = _define("KeySizeRangeError", CKR.CKR_KEY_SIZE_RANGE, "Key size unsupported.")
MechanismInvalidError = _define(
    "MechanismInvalidError", CKR.CKR_MECHANISM_INVALID, "Mechanism not supported."
)
MechanismParamInvalidError = _define(
    "MechanismParamInvalidError", CKR.CKR_MECHANISM_PARAM_INVALID, "Bad mechanism parameter."
)
ObjectHandleInvalidError = _define(
    "ObjectHandleInvalidError", CKR.CKR_OBJECT_HANDLE_INVALID, "No such object."
)
OperationActiveError = _define(
    "OperationActiveError", CKR.CKR_OPERATION_ACTIVE, "Another operation is active."
)
OperationNotInitializedError = _define(
    "OperationNotInitializedError", CKR.CKR_OPERATION_NOT_INITIALIZED, "No operation active."
)
PinInvalidError = _define("PinInvalidError", CKR.CKR_PIN_INVALID, "PIN has invalid characters.")
PinLenRangeError = _define("PinLenRangeError", CKR.CKR_PIN_LEN_RANGE, "PIN length wrong.")
SessionHandleInvalidError = _define(
    "SessionHandleInvalidError", CKR.CKR_SESSION_HANDLE_INVALID, "No such session."
)
SessionParallelNotSupportedError = _define(
    "SessionParallelNotSupportedError",
    CKR.CKR_SESSION_PARALLEL_NOT_SUPPORTED,
    "CKF_SERIAL_SESSION is required.",
)
SessionReadOnlyError = _define(
    "SessionReadOnlyError", CKR.CKR_SESSION_READ_ONLY, "Session is read-only."
)
SignatureInvalidError = _define(
    "SignatureInvalidError", CKR.CKR_SIGNATURE_INVALID, "Signature invalid."
)
TemplateIncompleteError = _define(
    "TemplateIncompleteError", CKR.CKR_TEMPLATE_INCOMPLETE, "Template incomplete."
)
TemplateInconsistentError = _define(
    "TemplateInconsistentError", CKR.CKR_TEMPLATE_INCONSISTENT, "Template inconsistent."
)
TokenNotPresentError = _define(
    "TokenNotPresentError", CKR.CKR_TOKEN_NOT_PRESENT, "No token in the slot."
)
TokenNotRecognizedError = _define(
    "TokenNotRecognizedError", CKR.CKR_TOKEN_NOT_RECOGNIZED, "Token not recognized."
)
UserAlreadyLoggedInError = _define(
    "UserAlreadyLoggedInError", CKR.CKR_USER_ALREADY_LOGGED_IN, "Already logged in."
)
UserNotLoggedInError = _define("UserNotLoggedInError", CKR.CKR_USER_NOT_LOGGED_IN, "Not logged in.")
UserTypeInvalidError = _define("UserTypeInvalidError", CKR.CKR_USER_TYPE_INVALID, "Bad user type.")
BufferTooSmallError = _define("BufferTooSmallError", CKR.CKR_BUFFER_TOO_SMALL, "Buffer too small.")
FunctionRejectedError = _define("FunctionRejectedError", CKR.CKR_FUNCTION_REJECTED, "Rejected.")
CryptokiNotInitializedError = _define(
    "CryptokiNotInitializedError", CKR.CKR_CRYPTOKI_NOT_INITIALIZED, "Not initialized."
)
ActionProhibitedError = _define(
    "ActionProhibitedError", CKR.CKR_ACTION_PROHIBITED, "Action prohibited by policy."
)


class LoginBackoffError(FunctionFailedError):  # type: ignore[misc,valid-type]
    """A wrong PIN was entered on this token moments ago: C_Login is refused, without
    touching the token, for ``retry_after`` seconds (docs/threat-model.md, wrong PIN)."""

    def __init__(self, message: str = "", *, retry_after: float = 0.0) -> None:
        self.retry_after = retry_after
        super().__init__(
            message
            or f"a wrong PIN was just entered on this token; try again in {retry_after:.1f} s"
        )

    def data(self) -> dict[str, object]:
        return {"retry_after": round(getattr(self, "retry_after", 0.0), 3)}


class TransportError(DeviceRemovedError):  # type: ignore[misc,valid-type]
    """A transport failed in the middle of an operation: counts as a disconnect (§5.1)."""


class CardNotVerifiedError(UserNotLoggedInError):  # type: ignore[misc,valid-type]
    """The card itself refused: "security status not satisfied" (6982). Unlike tokend's own
    refusals, this means the card lost a verification tokend believed in."""


class CardResetError(TokendError):
    """Another program reset the card: the card-side login is gone (§5.3)."""

    ckr = CKR.CKR_USER_NOT_LOGGED_IN
